"""`python -m nvdp.entrypoint ARGS`: run `nvidia-device-plugin ARGS`.

The container image starts the plugin through deployments/container/nvidia-device-plugin, a shell
wrapper that execs this module with argv[0] set to exactly "nvidia-device-plugin": the official
config-manager sidecar finds the process to signal by that name, and a console script would show
the interpreter there instead.
"""

from nvdp.cli import serve_main

if __name__ == "__main__":
    serve_main(prog_name="nvidia-device-plugin")
