"""The smallest ELF shared object `ldconfig` accepts: a header, one PT_LOAD and one PT_DYNAMIC
segment, and a dynamic section naming its soname. It holds no code (nothing can load it); the
simulated driver root uses it so that a real `ldconfig -r` builds a real ld cache for it."""

from __future__ import annotations

import platform
import struct

# platform.machine() -> ELF e_machine
MACHINES = {"x86_64": 62, "aarch64": 183, "ppc64le": 21, "s390x": 22}
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_DYN = struct.Struct("<qQ")
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_STRTAB, DT_STRSZ, DT_SONAME = 0, 5, 10, 14


def host_machine() -> int:
    return MACHINES.get(platform.machine(), MACHINES["x86_64"])


def shared_object(soname: str, note: str = "", machine: int | None = None) -> bytes:
    """An ELF64 little-endian ET_DYN whose DT_SONAME is `soname`; `note` is kept in its string
    table so that a test can recognise the file (e.g. after it was mounted into a container)."""
    strtab = b"\0" + soname.encode() + b"\0" + note.encode() + b"\0"
    dynamic_at = _EHDR.size + 2 * _PHDR.size
    strtab_at = dynamic_at + 4 * _DYN.size
    size = strtab_at + len(strtab)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, little-endian, ELF version 1
    header = _EHDR.pack(ident, 3, machine or host_machine(), 1, 0, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size,
                        2, 64, 0, 0)
    load = _PHDR.pack(PT_LOAD, 4, 0, 0, 0, size, size, 0x1000)
    dynamic = _PHDR.pack(PT_DYNAMIC, 4, dynamic_at, dynamic_at, dynamic_at, 4 * _DYN.size, 4 * _DYN.size, 8)
    entries = b"".join(_DYN.pack(tag, value) for tag, value in (
        (DT_SONAME, 1), (DT_STRTAB, strtab_at), (DT_STRSZ, len(strtab)), (DT_NULL, 0)))
    return header + load + dynamic + entries + strtab
