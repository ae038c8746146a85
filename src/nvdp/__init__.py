"""nvdp: the NVIDIA GPU device plugin for Kubernetes, in Python."""

# The one place the version is written: pyproject.toml reads it from here (setuptools dynamic
# version). A literal rather than importlib.metadata, which costs 50-100 ms of every start-up.
__version__ = "0.1.0"

__all__ = ["__version__"]
