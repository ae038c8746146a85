"""`python -m nvdp.entrypoint ARGS`: run the image binary that argv[0] names, with ARGS.

The container image starts its binaries through deployments/container/argv0-wrapper, a shell
wrapper that execs this module with argv[0] set to exactly the binary's name
(`nvidia-device-plugin`, `gpu-feature-discovery`, `mps-control-daemon`): the official
config-manager sidecar finds the process to signal by that name, and a console script would show
the interpreter there instead. Any other argv[0] runs the plugin (`nvdp.cli.image_main`).
"""

from nvdp.app import early_signals

if __name__ == "__main__":
    early_signals.install()  # before the CLI and gRPC are imported (nvdp/launch.py says why)
    from nvdp.cli import image_main

    image_main()
