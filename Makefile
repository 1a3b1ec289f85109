# The two commands a newcomer types: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. On Linux x86-64 PyPI's torch
# wheel brings the CUDA libraries, so torch comes from PyTorch's CPU wheel index there.
TORCH ?= torch==2.13.0
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu
endif
EXTRAS ?= llamacpp,models,torch,mlx,report,stats,parquet,server,hub,ray,dev
LLAMA_CPP ?= llama-cpp-python==0.3.36
# llama.cpp builds from source with -march=native; its AMX kernels crash on (virtual) CPUs
# that report AMX without the kernel granting it, so x86_64 builds leave AMX out.
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: install quickstart test test-fast bench clean

$(BIN)/kmm: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_INDEX) "$(TORCH)"
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(BIN)/pip install "$(LLAMA_CPP)"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $(BIN)/kmm

install: $(BIN)/kmm

quickstart: install
	$(BIN)/kmm run recipes/quickstart.toml --out runs/quickstart

test: install
	$(BIN)/python -m pytest -ra

test-fast: install
	$(BIN)/python -m pytest -ra -m "not integration and not slow and not mlx"

bench: install
	$(BIN)/python bench/check_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
