"""CDI spec files on disk: written atomically, rewritten only when their content changes.

A container runtime may read the folder at any moment (podman and containerd rescan it on every
container create), so a spec is never seen half-written: the text goes to a temporary file in the
same folder, is flushed to disk, made 0644 and renamed over the old file; the folder is flushed
too so that the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nvdp.errors import CdiSpecError

MODE = 0o644


def read_text(path: str) -> str | None:
    """The file's text; None when it does not exist or cannot be read as text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def write_atomically(path: str, text: str, mode: int = MODE) -> bool:
    """Write `text` to `path` unless the file already holds exactly that; True when written.
    CdiSpecError names the path when the folder cannot be created or written."""
    if read_text(path) == text:
        return False
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CdiSpecError(f"cannot write CDI specs in {folder}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise CdiSpecError(f"cannot write {path}: {exc.strerror}") from exc
    _sync_folder(folder)
    return True


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Written:
    """What one sync did: files written (content changed), left as they were, and removed."""

    written: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


def sync_folder(folder: str, files: Sequence[tuple[str, str]], ours: Iterable[str]) -> Written:
    """Make `folder` hold these (file name, text) pairs; of the file names in `ours` (every name
    nvdp may write), those not in `files` are removed (a feature turned off, an empty class)."""
    written: list[str] = []
    unchanged: list[str] = []
    removed: list[str] = []
    for name, text in files:
        path = os.path.join(folder, name)
        (written if write_atomically(path, text) else unchanged).append(path)
    keep = {name for name, _ in files}
    for name in ours:
        path = os.path.join(folder, name)
        if name not in keep and os.path.lexists(path):
            try:
                os.unlink(path)
            except OSError as exc:
                raise CdiSpecError(f"cannot remove the stale spec {path}: {exc.strerror}") from exc
            removed.append(path)
    return Written(tuple(written), tuple(unchanged), tuple(removed))
