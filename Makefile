# The two commands of the README. Both create the virtual environment and install pinned
# dependencies themselves (constraints.txt holds the tested versions; pyproject the ranges).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
ARGS ?=
LINTED := $(wildcard src tests benchmarks)

.PHONY: train test lint install install-dev bench accuracy clean

train: $(VENV)/.installed
	$(BIN)/mnist-resnet train $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q $(ARGS)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: python3.11 (or python3) not found on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench.py $(ARGS)

# The accuracy table of docs/results.md: --preset best, 3 seeds per dataset, then their ensembles.
accuracy: $(VENV)/.installed
	$(BIN)/python benchmarks/accuracy.py $(ARGS)
