# The two set-up commands of the README: `make serve` (the main job) and `make test` (lint, then the whole suite).
PYTHON ?= python3
# The CPython the locks are compiled for (`make lock`): their wheels are cp311, so another version's pip finds none of
# them and fails deep in --require-hashes; the venv target checks $(PYTHON) first.
LOCKED_PYTHON := 3.11
WRONG_PYTHON = make: $(PYTHON) is Python $${version:-(unknown: it did not run)}, but $(LOCK) pins CPython \
	$(LOCKED_PYTHON) wheels: run \`make serve PYTHON=python$(LOCKED_PYTHON)\` (or PYTHON=python$(LOCKED_PYTHON) with any \
	other target)
VENV ?= .venv
PY := $(VENV)/bin/python
# The extras of the dev/CI venv; locks/dev.txt pins them and all they pull in, with hashes (`make lock`: uv, dev extra).
EXTRAS ?= serve,cpu,train,export,dev,bench
LOCK ?= locks/dev.txt
comma := ,

.PHONY: install system-deps lint test serve demo-model clean clean-demo lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	@version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') && test "$$version" = $(LOCKED_PYTHON) \
		|| { echo "$(WRONG_PYTHON)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Exactly the locked files (pip refuses any whose sha256 is not in the lock); torch/torchvision 2.14.1 / 0.29.1
	# come from the local wheels here, and the lock holds those wheels' hashes. Then the project itself, no deps.
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Re-pin after editing pyproject.toml's dependencies: locks/dev.txt (this venv, CI) and locks/service-cpu.txt (the
# service-cpu image), and after editing locks/ort-gpu-probe.in: locks/ort-gpu-probe.txt (below), for CPython 3.11 on
# x86-64 Linux. uv takes each version from PyPI or from the local wheel
# folders pip is configured with here (LOCK_SOURCES), whichever has it (torch 2.14.1 is only local here). The GPU
# image is not locked: its NVIDIA-index wheels cannot be hashed from here (deploy/gpu-constraints.txt pins them);
# what it shares with service-cpu is pinned at that lock's versions (locks/service-gpu-constraints.txt, from it).
GPU_IMAGE_UNCONSTRAINED = onnxruntime openvino openvino-telemetry
LOCK_SOURCES ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels) \
	$(foreach index,$(wildcard /opt/pypi/simple /opt/pypi-more/simple),--extra-index-url file://$(index))
UV ?= $(PY) -m uv
UV_COMPILE_FLAGS = --generate-hashes --python-version $(LOCKED_PYTHON) --python-platform x86_64-manylinux_2_28 \
	--index-strategy unsafe-best-match --custom-compile-command "make lock" $(LOCK_SOURCES)
UV_COMPILE = $(UV) pip compile pyproject.toml $(UV_COMPILE_FLAGS)

lock:
	$(UV_COMPILE) $(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra)) -o locks/dev.txt
	$(UV_COMPILE) --extra serve --extra cpu -o locks/service-cpu.txt
	$(PY) deploy/lock_constraints.py locks/service-cpu.txt $(GPU_IMAGE_UNCONSTRAINED:%=--without %) \
		> locks/service-gpu-constraints.txt
	$(UV) pip compile locks/ort-gpu-probe.in --no-deps $(UV_COMPILE_FLAGS) -o locks/ort-gpu-probe.txt

# System packages the tests use: headless Chromium (web page test), promtool (Prometheus config check). Root, as on CI.
system-deps:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)  # the tests' path
	@command -v promtool >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# The GPU build of ONNX Runtime, apart from the venv (it would replace the CPU package there): on this GPU-less
# machine tests/service/test_ort_providers.py proves with it that a GPU provider that does not load is refused.
# Inside the venv folder, so it goes with it (make clean) and no repository-wide check reads its files.
# Hash-pinned as the venv is (locks/ort-gpu-probe.txt; the same version as the CPU package in locks/dev.txt).
ORT_GPU_PROBE := $(VENV)/ort-gpu-probe

$(ORT_GPU_PROBE)/.installed: locks/ort-gpu-probe.txt
	$(PY) -m pip install -q --upgrade --no-deps --require-hashes --target $(ORT_GPU_PROBE) -r locks/ort-gpu-probe.txt
	touch $@

# ruff over everything; mypy over the torch-free serving layers (pyproject.toml [tool.mypy] says which files).
lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# The suite on a pytest-xdist worker per CPU (at most 4), each taking whole files (a module's fixtures are built once);
# `make test PYTEST_WORKERS=0` runs it in one process. The 20 slowest tests are listed at the end. A worker that dies
# (a crash in native code) ends the run with that test named: replaced, one left the run waiting without end.
PYTEST_WORKERS ?= logical
test: lint install system-deps $(ORT_GPU_PROBE)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile --max-worker-restart 0 --durations=20

# Train the offline demo model (digits, CPU, minutes) and export it to ./models unless a version of it is there already
# (a published one, with its manifest: an export that was interrupted leaves the model's folder without one). A run
# interrupted before (or finished, its export not) is resumed, from checkpoint_last.pth, else a best checkpoint (a kill
# during the first epoch's save leaves only those): training refuses to start over on its checkpoints.
demo-model: install
	@if ! ls models/digits/*/manifest.json >/dev/null 2>&1; then \
		$(PY) -m training --preset demo --output runs/demo $$(for checkpoint in checkpoint_last.pth \
			checkpoint_best.pth checkpoint_best_ema.pth; do test -f runs/demo/$$checkpoint \
			&& echo --resume runs/demo/$$checkpoint && break; done) && \
		$(PY) -m export onnx --model convnext_atto --checkpoint runs/demo/checkpoint_best.pth --name digits --repository models; \
	fi

# `make serve PRETRAINED=convnext_tiny_1k_224_ema`: download the official ImageNet-1K weights, export, serve them.
ifdef PRETRAINED
serve: install
	$(PY) -m convnext_cli serve --pretrained $(PRETRAINED) --repository models
else
serve: demo-model
	$(PY) -m convnext_cli serve --repository models --model digits
endif

# The venv and the tools' caches only: runs/ (training runs, possibly days of them) and models/ (exports) stay.
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# What `make serve` made for the demo, its training run and its export, so that the next one trains and exports anew.
clean-demo:
	rm -rf runs/demo models/digits
