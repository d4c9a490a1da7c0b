# Thin wrapper: every target first makes sure .venv exists and holds wren and its dependencies.
#   make train   train configs/tiny.toml (the default model on the embedded default data)
#   make test    run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wren-installed
CONFIG ?= configs/tiny.toml

.PHONY: venv train test bench clean

venv: $(STAMP)

# torch first: a CUDA build where a GPU driver is present, otherwise the CPU build pinned here
# (an unpinned torch on a CPU machine would pull a multi-GB CUDA build). The installed torch is then
# pinned as a constraint, so no dependency can swap it. DS_BUILD_OPS=0: DeepSpeed builds its ops
# just in time instead of at install. mup goes in without its dependencies: it declares torchvision,
# whose registry build is linked against CUDA and breaks CPU torch (dependency notes).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "torch>=2.6,<2.15"; \
	  else $(PY) -m pip install "torch==2.13.0"; fi; }
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	DS_BUILD_OPS=0 PIP_CONSTRAINT=$(abspath $(VENV))/torch-constraint.txt $(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "mup>=1.0"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/wren train $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf runs .wren_cache
