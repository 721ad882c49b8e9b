# dopsd-ref: the two quickstart commands are `make demo` and `make test`.
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines: the local CPU wheel. On a GPU machine: make TORCH_SPEC="torch" ...
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= toy,repro,tutorials,dev
ARGS ?=

.PHONY: demo demo-core test test-all install clean weights-v2

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

## The main job on the embedded toy default: D-OPSD vs SFT vs base on the shipped 4-step toy.
demo: $(VENV)/.installed
	$(PY) -m toy_models.demo $(ARGS)

## The 2-D core demonstration (torch only, seconds).
demo-core: $(VENV)/.installed
	$(PY) -m dopsd_ref.demo $(ARGS)

## The test suite in fast mode (what CI runs): slow checks are skipped.
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(ARGS)

## Everything, slow acceptance checks included.
test-all: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

## Toy world v2: the candidate weights' whole training chain (about 2 h of CPU; resumable).
weights-v2: $(VENV)/.installed
	PYTHON=$(PY) bash toy_models/recipes/v2_chain.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
