"""`python -m nvdp.entrypoint.config_manager ARGS`: run `config-manager ARGS`, through
deployments/container/config-manager (see the package docstring)."""

from nvdp.cli import config_manager_main

if __name__ == "__main__":
    config_manager_main(prog_name="config-manager")
