"""The NVML backend: the only package that imports pynvml.

- `seam.py`: `Nvml`, the one door to pynvml (or a fake of it); NVML failures become nvdp errors;
- `library.py`: where libnvidia-ml is looked for under the driver root, opening NVML;
- `sysfs.py`: node files read beside NVML (NUMA node, MIG capability minors);
- `discovery.py`: `NvmlBackend`, discovery of GPUs, MIG devices, topology and versions;
- `health.py`: the event waiter and the probe.
"""
