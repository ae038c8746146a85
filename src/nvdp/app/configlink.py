"""The config-manager's file side: the folder of named configs and the link the plugin reads.

As the official config-manager: the folder's entries are the config names, except directories and
names starting with ".." (a mounted ConfigMap's own `..data` link and timestamped folder); the
destination is a symlink to `<folder>/<name>`, or to /dev/null for the empty config; nothing
changes when both already resolve to the same file (a ConfigMap update moves `..data`, and both
follow it).

Unlike it: the link is replaced atomically (a new link renamed over the old one, so the plugin
never finds the file missing), a dangling link of ours is replaced rather than an error, and a
destination that is not a symlink is never removed: that is an error naming the path.
"""

from __future__ import annotations

import os

from nvdp.config.inputs import InputFileError, read_text_file
from nvdp.core.nodeconfig import EMPTY
from nvdp.errors import NodeConfigError

DEV_NULL = "/dev/null"


def available_configs(srcdir: str) -> frozenset[str]:
    try:
        entries = list(os.scandir(srcdir))
    except FileNotFoundError:
        raise NodeConfigError(f"config folder {srcdir} does not exist (is the ConfigMap mounted there?)") from None
    except NotADirectoryError:
        raise NodeConfigError(f"config folder {srcdir} is not a directory") from None
    except OSError as exc:
        raise NodeConfigError(f"config folder {srcdir} cannot be read: {exc.strerror or exc}") from None
    names = set()
    for entry in entries:
        if entry.name.startswith(".."):
            continue
        try:
            if entry.is_dir():
                continue
        except OSError:
            pass  # a dangling entry: listed, and reading it later names the problem
        names.add(entry.name)
    return frozenset(names)


def source_path(srcdir: str, name: str) -> str:
    return DEV_NULL if name == EMPTY else os.path.join(srcdir, name)


def read_config(path: str) -> str:
    """The text of a config file, to validate it before switching: read as the plugin reads its
    config file (config/inputs.py: at most 1 MiB, UTF-8), so what passes here loads there too."""
    try:
        return read_text_file(path)
    except OSError as exc:
        raise NodeConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except InputFileError as exc:  # names the file: too large, or not UTF-8 text
        raise NodeConfigError(f"config file {exc}") from None


def _check_ours(dst: str) -> bool:
    """True when `dst` is a symlink (ours to replace), False when nothing is there."""
    if not os.path.lexists(dst):
        return False
    if not os.path.islink(dst):
        kind = "a directory" if os.path.isdir(dst) else "a file"
        raise NodeConfigError(f"config destination {dst} is {kind}, not a symlink: not touching it "
                              "(CONFIG_FILE_DST must be a path the config-manager owns, e.g. in an emptyDir)")
    return True


def current_target(dst: str) -> str | None:
    """What the link resolves to now (None: no link, or a dangling one)."""
    if not _check_ours(dst) or not os.path.exists(dst):
        return None
    return os.path.realpath(dst)


def point(dst: str, src: str) -> bool:
    """Make `dst` a symlink to `src`; False when it already resolves to the same file."""
    if not os.path.exists(src):
        raise NodeConfigError(f"config file {src} does not exist")
    if current_target(dst) == os.path.realpath(src):
        return False
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise NodeConfigError(f"config destination folder {folder} does not exist")
    temporary = os.path.join(folder, f".{os.path.basename(dst)}.nvdp-{os.getpid()}")
    try:
        if os.path.lexists(temporary):
            os.unlink(temporary)  # left by an earlier run of ours with the same pid
        os.symlink(src, temporary)
        os.replace(temporary, dst)  # atomic: the plugin sees the old file or the new one, never none
    except OSError as exc:
        raise NodeConfigError(f"cannot point {dst} at {src}: {exc.strerror or exc}") from None
    return True
