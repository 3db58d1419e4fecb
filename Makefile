# The two set-up commands of the README. Each creates .venv at the repository root and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dualtoken demo --out demo_out

test: install
	$(BIN)/python -m pytest -q -x -rs --durations=15

lint: install
	$(BIN)/ruff check src tests benchmarks
