"""A folder laid out as the kubelet mounts a ConfigMap volume, for tests and the demo.

    <folder>/..2024_01_01_00_00_00.123/<key>   the files of one version of the ConfigMap
    <folder>/..data -> ..2024_01_01_00_00_00.123
    <folder>/<key> -> ..data/<key>

An update writes a new timestamped folder and swaps `..data` atomically, as the kubelet does, so
every `<key>` link follows at once.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping


def write_configmap(folder: str, files: Mapping[str, str]) -> None:
    """Create or update the volume in `folder` with exactly `files` (key -> text)."""
    os.makedirs(folder, exist_ok=True)
    data_link = os.path.join(folder, "..data")
    old = os.readlink(data_link) if os.path.islink(data_link) else None
    version = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    os.mkdir(os.path.join(folder, version))
    for key, text in files.items():
        with open(os.path.join(folder, version, key), "w", encoding="utf-8") as f:
            f.write(text)
    temporary = os.path.join(folder, "..data_tmp")
    os.symlink(version, temporary)
    os.replace(temporary, data_link)
    for key in files:
        link = os.path.join(folder, key)
        if not os.path.islink(link):
            os.symlink(os.path.join("..data", key), link)
    for name in os.listdir(folder):  # keys that left the ConfigMap
        if not name.startswith("..") and name not in files and os.path.islink(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))
    if old is not None:
        shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
