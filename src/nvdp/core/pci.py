"""PCI facts of a GPU that NVML does not give: the class code and the vGPU capability record.

Pure: the NVML backend reads the sysfs files (`backends/nvml/sysfs.py`) and hands their contents
here. The vGPU rules follow the official GPU feature discovery (upstream-behaviour.md section 8):
a vGPU guest device carries a vendor-specific PCI capability whose bytes 3-4 are the signature
"VF"; its records start at byte 5 (one id byte, one length byte each) and record 0 holds the
host driver's version and branch, 10 NUL-padded bytes each.
"""

from __future__ import annotations

from nvdp.core.devices import VgpuInfo

CLASS_3D_CONTROLLER = 0x030200  # a compute GPU (no display engine exposed)
CLASS_VGA = 0x030000  # a GPU with its display engine exposed

_STATUS = 0x06  # PCI status register
_STATUS_CAPABILITY_LIST = 0x10  # the status bit saying a capability list exists
_CAPABILITY_POINTER = 0x34
_VENDOR_SPECIFIC = 0x09  # capability id
_VGPU_SIGNATURE = b"VF"
_RECORDS_START = 5
_FIELD = 10  # bytes of the host driver version, then of the branch
FULL_CONFIG = 256  # what a privileged reader gets; an unprivileged one sees only the first 64 bytes


def parse_class(text: str) -> int | None:
    """The sysfs `class` file ("0x030200\\n") as a number; None for anything else."""
    try:
        return int(text.strip(), 16)
    except ValueError:
        return None


def vendor_capability(config: bytes) -> bytes | None:
    """The first vendor-specific capability of a PCI config space, or None without one.
    A looping or broken capability chain ends the walk, as upstream."""
    if len(config) < FULL_CONFIG or not config[_STATUS] & _STATUS_CAPABILITY_LIST:
        return None
    seen: set[int] = set()
    pos = config[_CAPABILITY_POINTER]
    while pos and pos not in seen and pos + 2 < len(config):
        seen.add(pos)
        cap_id, following, length = config[pos], config[pos + 1], config[pos + 2]
        if cap_id == 0xFF:
            return None
        if cap_id == _VENDOR_SPECIFIC:
            return config[pos : pos + length]
        pos = following
    return None


def vgpu_info(config: bytes) -> VgpuInfo | None:
    """The vGPU host driver named by a device's PCI config space; None when the device is not a
    vGPU (no vendor capability with the "VF" signature). A vGPU whose capability has no driver
    record gives empty strings (the official GFD fails there instead)."""
    cap = vendor_capability(config)
    if cap is None or len(cap) < _RECORDS_START or cap[3:5] != _VGPU_SIGNATURE:
        return None
    pos = _RECORDS_START
    # Records chain by their length byte until record id 0 (the host driver record).
    while pos < len(cap) and cap[pos] != 0:
        length = cap[pos + 1] if pos + 1 < len(cap) else 0
        if length == 0:  # a zero-length record would never advance
            return VgpuInfo("", "")
        pos += length
    start = pos + 2
    if pos >= len(cap) or start + 2 * _FIELD > len(cap):
        return VgpuInfo("", "")

    def field(at: int) -> str:
        return cap[at : at + _FIELD].strip(b"\x00").decode("ascii", errors="replace")

    return VgpuInfo(host_driver_version=field(start), host_driver_branch=field(start + _FIELD))
