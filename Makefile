# monai-mae: `make test` and `make demo` work on a fresh machine; both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A bare `torch` requirement pulls the newest CUDA build (gigabytes). When no torch is importable,
# install the pinned build first: on a CPU-only machine that is the CPU wheel.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python -m monai_mae.demo

bench: install
	$(BIN)/python benchmarks/bench_vs_monai.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
