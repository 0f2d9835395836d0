# Quick start: `make demo` (main job on built-in phantoms) and `make test` (the test suite).
# Both create .venv and install what they need on first use; only python3 is required.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel for this set-up. GPU users: see README ("GPU install") and override, e.g.
#   make demo TORCH_SPEC="torch==2.13.0"   after installing a CUDA build into .venv yourself.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint format clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,federated,onnx,scale]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/umit demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean-venv:
	rm -rf $(VENV)
