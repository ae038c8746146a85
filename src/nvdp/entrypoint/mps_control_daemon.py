"""`python -m nvdp.entrypoint.mps_control_daemon ARGS`: run `mps-control-daemon ARGS`, through
deployments/container/mps-control-daemon (see the package docstring)."""

from nvdp.cli import mps_daemon_main

if __name__ == "__main__":
    mps_daemon_main(prog_name="mps-control-daemon")
