# invact — every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TRITON_INTERPRET lets Triton kernels run on the CPU (no GPU on CI).
export TRITON_INTERPRET ?= 1
# Inductor's CPU cache key leaves out the vector ISA it compiles for (ATEN_CPU_CAPABILITY or the CPU's):
# graphs cached under AVX-512 and reused under ATEN_CPU_CAPABILITY=avx2 gave wrong packed codes
# (measured, tests/test_environment.py::test_inductor_cache_shared_between_isas), so each ISA gets its own cache.
CPU_ISA := $(or $(ATEN_CPU_CAPABILITY),$(if $(shell grep -m1 -ow avx512f /proc/cpuinfo 2>/dev/null),avx512,native))
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor-$(CPU_ISA)
export MPLBACKEND ?= Agg

.PHONY: setup demo test generate bench clean

setup: $(STAMP)

# torch is pinned and installed first, so that no dependency pulls another torch. Which build pip
# finds is pip's configuration (here a local wheel folder); plain PyPI's Linux x86_64 torch is the CUDA
# build: TORCH_INDEX='--index-url https://download.pytorch.org/whl/cpu' asks for the CPU one.
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) torch==2.13.0
	$(BIN)/python -m pip install -q triton==3.7.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

generate: $(STAMP)
	$(BIN)/invact generate

bench: $(STAMP)
	$(BIN)/python benchmarks/fit_speed.py

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
