# The two set-up commands of the README: `make serve` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= serve,cpu,train,export,dev

.PHONY: install system-deps test serve demo-model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from the local wheels here.
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# System packages the tests use: headless Chromium (web page test), promtool (Prometheus config check). Root, as on CI.
system-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	@command -v promtool >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# The GPU build of ONNX Runtime, apart from the venv (it would replace the CPU package there): on this GPU-less
# machine tests/service/test_ort_providers.py proves with it that a GPU provider that does not load is refused.
# Inside the venv folder, so it goes with it (make clean) and no repository-wide check reads its files.
ORT_GPU_PROBE := $(VENV)/ort-gpu-probe
ORT_GPU_VERSION ?= 1.31.1

$(ORT_GPU_PROBE)/.installed:
	$(PY) -m pip install -q --upgrade --no-deps --target $(ORT_GPU_PROBE) onnxruntime-gpu==$(ORT_GPU_VERSION)
	touch $@

test: install system-deps $(ORT_GPU_PROBE)/.installed
	$(PY) -m pytest

# Train the offline demo model (digits, CPU, minutes) and export it to ./models unless it is there already.
demo-model: install
	@if [ ! -d models/digits ]; then \
		$(PY) -m training --preset demo --output runs/demo && \
		$(PY) -m export onnx --model convnext_atto --checkpoint runs/demo/checkpoint_best.pth --name digits --repository models; \
	fi

# `make serve PRETRAINED=convnext_tiny_1k_224_ema`: download the official ImageNet-1K weights, export, serve them.
ifdef PRETRAINED
serve: install
	$(PY) -m convnext_cli serve --pretrained $(PRETRAINED) --repository models
else
serve: demo-model
	$(PY) -m service --repository models
endif

clean:
	rm -rf $(VENV) runs models .pytest_cache
