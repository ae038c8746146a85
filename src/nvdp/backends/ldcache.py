"""glibc's binary `ld.so.cache`: read it (to find the driver's libraries under a driver root) and
write it (for the simulated driver root where `ldconfig -r` cannot run).

Two layouts exist. The current one (glibc >= 2.32 writes only this) starts with
`glibc-ld.so.cache1.1`: a 48-byte header (entry count, string table size, an endianness byte,
extension offset), then 24-byte entries (flags, soname offset, path offset, OS version, hwcap),
then the strings; offsets count from the start of that header. Older caches start with the
libc5-era `ld.so-1.7.0` header and 12-byte entries, optionally followed (8-byte aligned) by the
current layout, which is then preferred. Every malformed case is a `LdCacheError` saying what is
wrong; nothing here raises struct or index errors.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

NEW_MAGIC = b"glibc-ld.so.cache1.1"
OLD_MAGIC = b"ld.so-1.7.0"
_NEW_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, extension offset
_NEW_ENTRY = "iIIIQ"  # flags, key, value, osversion, hwcap
_OLD_ENTRY = "iII"  # flags, key, value

FLAG_ELF_LIBC6 = 0x0003
# The ABI half of an entry's flags (glibc's FLAG_REQUIRED_MASK) for 64-bit libraries.
ABI_64BIT = {
    0x0100: "sparc64",
    0x0300: "x86-64",
    0x0400: "s390x",
    0x0500: "ppc64",
    0x0700: "mips64",
    0x0A00: "aarch64",
    0x0F00: "riscv64",
    0x1000: "riscv64",
}
ABI_BY_MACHINE = {"x86_64": 0x0300, "aarch64": 0x0A00, "ppc64le": 0x0500, "s390x": 0x0400}
_ENDIAN = {0: "<", 2: "<", 3: ">"}  # 0: written before glibc recorded it (native, little here)


class LdCacheError(ValueError):
    """The file is not an ld.so.cache nvdp can read; the message says why."""


@dataclass(frozen=True)
class Entry:
    soname: str  # libcuda.so.1
    path: str  # /usr/lib/x86_64-linux-gnu/libcuda.so.1
    flags: int = FLAG_ELF_LIBC6 | 0x0300

    @property
    def is_64bit(self) -> bool:
        return (self.flags & 0xFF00) in ABI_64BIT


def _string(data: bytes, start: int, offset: int) -> str:
    at = start + offset
    end = data.find(b"\0", at)
    if offset < 0 or at >= len(data) or end < 0:
        raise LdCacheError(f"string offset {offset} points outside the file ({len(data)} bytes)")
    return data[at:end].decode("utf-8", "surrogateescape")


def _parse_new(data: bytes, start: int) -> list[Entry]:
    if len(data) < start + _NEW_HEADER.size:
        raise LdCacheError(f"truncated header ({len(data) - start} bytes after the magic's start)")
    flags = _NEW_HEADER.unpack_from(data, start)[3]  # one byte: the same in either byte order
    endian = _ENDIAN.get(flags & 0x3)
    if endian is None:
        raise LdCacheError(f"invalid endianness flag {flags:#x} in the header")
    nlibs = struct.unpack_from(endian + _NEW_HEADER.format[1:], data, start)[1]
    entry = struct.Struct(endian + _NEW_ENTRY)
    table = start + _NEW_HEADER.size
    if nlibs > (len(data) - table) // entry.size:
        raise LdCacheError(f"header says {nlibs} entries, the file holds at most {(len(data) - table) // entry.size}")
    entries = []
    for i in range(nlibs):
        e_flags, key, value, _os, _hwcap = entry.unpack_from(data, table + i * entry.size)
        entries.append(Entry(_string(data, start, key), _string(data, start, value), e_flags))
    return entries


def _parse_old(data: bytes) -> tuple[list[Entry], int]:
    """The libc5-era entries and where the part after them begins."""
    entry = struct.Struct("<" + _OLD_ENTRY)
    if len(data) < 16:
        raise LdCacheError("truncated old-format header")
    (nlibs,) = struct.unpack_from("<I", data, 12)
    table = 16
    if nlibs > (len(data) - table) // entry.size:
        raise LdCacheError(f"old-format header says {nlibs} entries, the file is too short for them")
    strings = table + nlibs * entry.size
    entries = []
    for i in range(nlibs):
        e_flags, key, value = entry.unpack_from(data, table + i * entry.size)
        entries.append(Entry(_string(data, strings, key), _string(data, strings, value), e_flags))
    return entries, strings


def parse(data: bytes) -> list[Entry]:
    """Every entry of the cache, in file order (ldconfig sorts them; we do not rely on it)."""
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0)
    if data.startswith(OLD_MAGIC):
        old, after = _parse_old(data)
        start = data.find(NEW_MAGIC, after)  # the current layout, hidden after the old strings
        if start >= 0 and start % 8 == 0:
            return _parse_new(data, start)
        return old
    raise LdCacheError(f"unknown format (starts with {data[:20]!r}, expected {NEW_MAGIC.decode()!r})")


def encode(entries: Sequence[Entry]) -> bytes:
    """A current-layout, little-endian cache holding these entries, as ldconfig writes it
    (entries sorted by soname, longest version first, so lookups in glibc would work too)."""
    ordered = sorted(entries, key=lambda e: e.soname, reverse=True)
    strings = bytearray()
    offsets: dict[str, int] = {}
    table = _NEW_HEADER.size + len(ordered) * struct.calcsize("<" + _NEW_ENTRY)
    for text in [s for e in ordered for s in (e.path, e.soname)]:
        if text not in offsets:
            offsets[text] = table + len(strings)
            strings += text.encode() + b"\0"
    header = _NEW_HEADER.pack(NEW_MAGIC, len(ordered), len(strings), 2, 0)
    body = b"".join(struct.pack("<" + _NEW_ENTRY, e.flags, offsets[e.soname], offsets[e.path], 0, 0) for e in ordered)
    return header + body + bytes(strings)
