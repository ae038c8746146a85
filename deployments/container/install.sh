#!/bin/bash
# install.sh PREFIX SRC [LINKDIR]: how the image installs nvdp (the Dockerfile runs this; so does the
# test tests/deploy/test_deploy_container.py, so both install the same way).
#   1. a fresh virtual environment at PREFIX, from the python3 on PATH (or $PYTHON);
#   2. the package from the source tree SRC (pyproject.toml, README.md, src/);
#   3. the argv[0] wrapper (argv0-wrapper) as PREFIX/bin/<name> for each binary below, in place of
#      pip's console scripts; then pip and setuptools leave the venv (nothing runs them, and the
#      image has no installer);
#   4. with LINKDIR: a symlink LINKDIR/<name> -> PREFIX/bin/<name> for each of the official image's
#      binaries that nvdp has (the image copies them to /usr/bin, where the official image keeps them).
set -euo pipefail
prefix=$1
src=$2
linkdir=${3:-}
# The official image's binaries, by the names operators' manifests use. All four; each is
# also a key of nvdp.cli.IMAGE_PROGRAMS, and tests/image/test_image.py checks them in the image.
binaries=(nvidia-device-plugin gpu-feature-discovery mps-control-daemon config-manager)
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --disable-pip-version-check "$src"
for name in "${binaries[@]}"; do
  install -m 0755 "$src/deployments/container/argv0-wrapper" "$prefix/bin/$name"
done
"$prefix/bin/python3" -m pip uninstall --quiet --yes setuptools pip
if [ -n "$linkdir" ]; then
  mkdir -p "$linkdir"
  for name in "${binaries[@]}"; do
    ln -sf "$prefix/bin/$name" "$linkdir/$name"
  done
fi
