# nvdp: make demo (simulated node, no GPU needed; runtime dependencies only) and make test, each from a
# fresh checkout.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deploy image test-image lint typecheck check bench proto profiles gpu-test clean

RUNTIME_STAMP := $(VENV)/.installed-runtime

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# make demo needs only the package and its runtime dependencies; make test the dev tools too.
$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/nvdp demo

test: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/pytest -q

# Deployment checks (docs/deployment.md): helm 3 + helm 4 lint/template, kubernetes-validate,
# the image's install steps. Tools are cached in .tools/ (ignored); the first run downloads ~75 MB.
DEPLOY_STAMP := $(VENV)/.installed-deploy
# The last kubernetes-validate release with extensions/v1beta1 schemas (for legacyDaemonsetAPI).
LEGACY_SCHEMAS := .tools/cache/kubernetes-validate-1.16.0.tar.gz

$(DEPLOY_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,deploy]'
	touch $(DEPLOY_STAMP)

$(LEGACY_SCHEMAS):
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d .tools/cache kubernetes-validate==1.16.0

test-deploy: $(DEPLOY_STAMP) $(LEGACY_SCHEMAS)
	$(BIN)/python scripts/install-helm
	$(BIN)/pytest -q -m deploy tests/deploy

# The container image (docs/deployment.md): podman or docker; without a reachable base image, a
# Debian base made with debootstrap. Both the base and the image are cached (.tools/cache, image
# tags keyed by the inputs), so a repeated build takes seconds.
IMAGE ?= localhost/nvdp:dev

image:
	$(PYTHON) scripts/build-image --tag $(IMAGE)

# The image run for real against the fake kubelet, with the static manifest's security options.
test-image: $(STAMP)
	scripts/install-container-tools
	$(PYTHON) scripts/build-image --tag $(IMAGE)
	NVDP_IMAGE=$(IMAGE) $(BIN)/pytest -q -m image tests/image

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

gpu-test: $(STAMP)
	$(BIN)/pytest -q -m gpu tests/gpu

bench: $(STAMP)
	$(BIN)/python -m bench

proto: $(STAMP)
	PATH=$(BIN):$$PATH PYTHON=$(BIN)/python scripts/gen-proto

# The built-in simulated profiles, precompiled to JSON (served without PyYAML and pydantic).
profiles: $(STAMP)
	$(BIN)/python scripts/compile-profiles

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
