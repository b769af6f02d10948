# The two commands of the README. Both create the virtual environment and install pinned
# dependencies themselves (constraints.txt holds the tested versions; pyproject the ranges).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Which torch build pip installs is whichever it finds for 2.13.0: PyPI's Linux wheel is the
# CUDA build (a 5 GB .venv). TORCH_INDEX=https://download.pytorch.org/whl/cpu adds PyTorch's
# CPU index, whose 2.13.0+cpu then wins (README: which build goes where).
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
ARGS ?=
LINTED := $(wildcard src tests benchmarks hubconf.py)

.PHONY: train test lint install install-dev bench accuracy pretrained clean

train: $(VENV)/.installed
	$(BIN)/mnist-resnet train $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy src
	$(BIN)/lint-imports
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
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .grimp_cache

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench.py $(ARGS)

# The accuracy table of docs/results.md: --preset best, 3 seeds per dataset, then their ensembles.
accuracy: $(VENV)/.installed
	$(BIN)/python benchmarks/accuracy.py $(ARGS)

# The models shipped in the package (src/mnist_resnet/pretrained/): each recipe of
# mnist_resnet.pretrained.RECIPES trained anew (its teachers first, where it has any; for a
# model that averages several runs, each run, then the file that packs them; data through the
# usual chain or DATA_DIR), then packaged and measured. A finished run of the same
# recipe in PRETRAINED_RUNS is kept and a killed one resumed, so an interrupted `make pretrained`
# continues where it stopped; delete the folder to start over. Pin the printed SHA-256s in
# src/mnist_resnet/pretrained/__init__.py: the tests fail until file, pin and metadata agree.
# Runs that need no other (an ensemble's members) train PRETRAINED_JOBS at a time, sharing the
# cores: on 2 cores, one thread each, as the shipped Fashion-MNIST members were trained.
PRETRAINED_RUNS ?= runs/pretrained
PRETRAINED_JOBS ?= 2
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
pretrained: $(VENV)/.installed
	$(BIN)/mnist-resnet pretrained train mnist $(DATA_FLAG) --runs-dir $(PRETRAINED_RUNS) --jobs $(PRETRAINED_JOBS)
	$(BIN)/mnist-resnet pretrained train fashion-mnist $(DATA_FLAG) --runs-dir $(PRETRAINED_RUNS) --jobs $(PRETRAINED_JOBS)
	$(BIN)/mnist-resnet pretrained package $(PRETRAINED_RUNS)/mnist --name mnist $(DATA_FLAG) --out src/mnist_resnet/pretrained
	$(BIN)/mnist-resnet pretrained package $(PRETRAINED_RUNS)/fashion-mnist --name fashion-mnist $(DATA_FLAG) --out src/mnist_resnet/pretrained
