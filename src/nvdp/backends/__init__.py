"""Where GPUs come from: the backend protocol, real NVML, and the simulated node."""
