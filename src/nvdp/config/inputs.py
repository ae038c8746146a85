"""Limits on what inputs may ask for, and reading an input file an operator names (a config file,
a simulated profile) as bounded UTF-8 text, so a wrong file (binary, huge, a directory) is one
clear error instead of a traceback or minutes of parsing."""

from __future__ import annotations

MAX_INPUT_BYTES = 1024 * 1024  # a ConfigMap holds at most 1 MiB; no real config comes near it


class InputFileError(ValueError):
    """The file was read but is not usable text; the message names the file and what is wrong."""


def read_text_file(path: str, limit: int = MAX_INPUT_BYTES) -> str:
    """The file's text. Raises OSError as `open` does (missing, a directory, no permission) and
    InputFileError when it is larger than `limit` bytes or not UTF-8."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # never more: a 10 GB file costs no more than a 1 MiB one
    check_size(path, len(data), limit)
    return decode(path, data)


def check_size(path: str, size: int, limit: int = MAX_INPUT_BYTES) -> None:
    if size > limit:
        raise InputFileError(f"{path} is larger than {limit // (1024 * 1024)} MiB (the most a ConfigMap holds): "
                             "is it the right file?")


def decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): is it the right file?"
        ) from None


# The kubelet reads ListAndWatch with gRPC's default receive limit, and the list cannot be split:
# a resource whose device list is larger is never seen by the kubelet.
KUBELET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Every replica `<id>::<n>` costs at least this many bytes of that list (its ID of 4 or more
# characters, its health and the framing), so no device can have more replicas than this.
MIN_DEVICE_BYTES = 16
MAX_DEVICES = KUBELET_MAX_MESSAGE_BYTES // MIN_DEVICE_BYTES
