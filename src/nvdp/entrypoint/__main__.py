"""`python -m nvdp.entrypoint ARGS`: run `nvidia-device-plugin ARGS` (the image's ENTRYPOINT,
through deployments/container/nvidia-device-plugin; see the package docstring)."""

from nvdp.cli import serve_main

if __name__ == "__main__":
    serve_main(prog_name="nvidia-device-plugin")
