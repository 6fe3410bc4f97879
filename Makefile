# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build from local disk on the project's machines; override, e.g. TORCH=torch, elsewhere.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fastweights main

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check fastweights tests benchmarks
