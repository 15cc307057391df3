# Every target runs inside .venv, created on first use. PIP_FIND_LINKS is cleared so pip
# resolves torch + torchvision from the registry as a matching pair (a local CPU-only torch
# wheel would break torchvision's ops, which timm imports).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= out/demo

.PHONY: venv test demo bench bench-kernels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(BIN)/pip install --quiet --upgrade pip
	PIP_FIND_LINKS= $(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m dynavit.demo --out $(DEMO)

bench-kernels: $(STAMP)
	$(BIN)/python -m dynavit.pipeline.bench_kernels

bench: $(STAMP)
	$(BIN)/python -m dynavit.trainer.bench_report --out docs/BENCHMARKS.md

clean:
	rm -rf out .pytest_cache
