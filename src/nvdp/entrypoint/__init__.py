"""The image's programs by the names the official image gives them, each run as
`python -m nvdp.entrypoint[.<module>] ARGS` by a shell wrapper (deployments/container/<name>) that
execs it with argv[0] set to that name: a config-manager finds the process to signal by its exact
argv[0], and a pip console script would show the interpreter there instead.

    python -m nvdp.entrypoint                      nvidia-device-plugin (argv[0] nvidia-device-plugin)
    python -m nvdp.entrypoint.mps_control_daemon   mps-control-daemon (argv[0] /usr/bin/mps-control-daemon)
    python -m nvdp.entrypoint.config_manager       config-manager (argv[0] config-manager)

Nothing is imported here, so `-m nvdp.entrypoint.<module>` runs its module once.
"""
