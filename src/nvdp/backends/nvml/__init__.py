"""The NVML backend: the only package that imports pynvml."""
