# The two commands that set up a fresh machine: `make train` (the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip on some machines warns about missing local index folders; keep the logs readable.
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CI compiles the CUDA kernels for one arch with no GPU present: proves they compile and link.
BUILD_ENV ?= MASKDM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$${MAX_JOBS:-2}
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

.PHONY: venv build test test-fast lint bench train info gpu-suite clean data check-triton

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q torch
	# Dependencies only; the extension is built by the .build-stamp rule below (once).
	MASKDM_SKIP_BUILD=1 $(PIP) install -q --no-build-isolation -e ".[test,bench]" $(QUIET)
	$(PY) -c "import torch, triton, maskdm_kernels" || { echo "environment set-up failed"; exit 1; }
	touch $@

# Rebuild the extension when a source or setup.py changes.
.build-stamp: $(VENV)/.installed $(CSRC) setup.py
	$(BUILD_ENV) $(PIP) install -q --no-build-isolation --no-deps -e . $(QUIET)
	$(PY) -c "import maskdm_kernels._C" || { echo "extension failed to build or load"; exit 1; }
	touch $@

build: .build-stamp

test: build
	$(PY) -m pytest tests -q -ra

# Every Triton kernel (each attention candidate config, bf16 and fp32) compiled for sm_90, no GPU needed, with the
# venv's triton and each other release the kernels support: no failed compile, bf16 products on the tensor cores, no
# ptxas spill (tests/test_triton_sm90.py names the exceptions). Each
# release goes to build/triton/VERSION (pip --target, 0.7-1 GB) and shadows the venv's through PYTHONPATH.
TRITON_VERSIONS ?= 3.6.0 3.7.1 3.9.0

check-triton: venv
	env -u TRITON_INTERPRET $(PY) tests/test_triton_sm90.py --all --check >/dev/null
	for v in $(TRITON_VERSIONS); do \
	  test -d build/triton/$$v/triton || $(PIP) install -q --no-deps --target build/triton/$$v triton==$$v $(QUIET); \
	  echo "triton $$v: sm_90 compile of every kernel and attention config"; \
	  PYTHONPATH=build/triton/$$v env -u TRITON_INTERPRET $(PY) tests/test_triton_sm90.py --all --check >/dev/null; \
	done

# Style gate (ruff's version is pinned in pyproject's test extra, so its rules do not drift).
lint: venv
	$(VENV)/bin/ruff check .

bench: build
	$(PY) -m pytest benchmarks --benchmark-only -q

info: build
	$(PY) -m maskdm_kernels.info

FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
TRAIN_CONFIG ?= configs/fashion_mnist_quick.yaml

# Fashion-MNIST from Debian's package where apt is available; else say how to get it.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing from $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'," \
	  "or put the four *-ubyte.gz files in a folder and pass data.root=FOLDER"; exit 1; fi

# The main job. The extension is built for this machine (CPU kernels here; CUDA too where a GPU is visible).
train: venv data
	test -f .build-stamp || { MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e . $(QUIET); }
	# CPU: two single-threaded DDP processes (gloo) use the 2 cores better than one 2-thread process.
	# GPU: one process per visible GPU (NCCL). NPROC overrides either.
	gpus=$$($(PY) -c "import torch; print(torch.cuda.device_count())"); \
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $${NPROC:-$$( [ "$$gpus" -gt 0 ] && echo $$gpus || echo 2 )} \
	  -m maskdm train --config $(TRAIN_CONFIG) --overwrite

# ~8 minutes on one H200, every phase under its own limit, results streamed as they come (benchmarks/README.md).
# DRY_RUN=1 make gpu-suite runs each phase briefly on a CPU machine.
gpu-suite:
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build .build-stamp maskdm_kernels/_C*.so maskdm_kernels/_build_info.py *.egg-info
