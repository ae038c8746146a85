"""`python -m nvdp.entrypoint ARGS`: run `nvidia-device-plugin ARGS`.

The container image starts the plugin through deployments/container/nvidia-device-plugin, a shell
wrapper that execs this module with argv[0] set to exactly "nvidia-device-plugin": the official
config-manager sidecar finds the process to signal by that name, and a console script would show
the interpreter there instead.
"""

from nvdp.app import early_signals

if __name__ == "__main__":
    early_signals.install()  # before the CLI and gRPC are imported (nvdp/launch.py says why)
    from nvdp.cli import serve_main

    serve_main(prog_name="nvidia-device-plugin")
