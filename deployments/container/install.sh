#!/bin/bash
# install.sh PREFIX SRC: how the image installs nvdp (the Dockerfile runs this; so does the test
# tests/deploy/test_deploy_container.py, so both install the same way).
#   1. a fresh virtual environment at PREFIX, from the python3 on PATH (or $PYTHON);
#   2. the package from the source tree SRC (pyproject.toml, README.md, src/);
#   3. the argv[0] wrapper as PREFIX/bin/nvidia-device-plugin, in place of pip's console script.
set -euo pipefail
prefix=$1
src=$2
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --disable-pip-version-check "$src"
install -m 0755 "$src/deployments/container/nvidia-device-plugin" "$prefix/bin/nvidia-device-plugin"
