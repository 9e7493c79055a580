# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
# `make check` is the fast tier (lint, format, types, unit tests: under 2 minutes); `make test` runs everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned, so that pip never resolves a multi-GB CUDA build by accident on a CPU machine;
# set TORCH_SPEC=torch to take whatever your platform's default build is.
TORCH_SPEC ?= torch==2.13.0
PEERS ?= 4

.PHONY: demo test check lint wheel clean

demo: $(VENV)/.installed
	$(VENV)/bin/peer swarm --peers $(PEERS) --json runs/demo-summary.json

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# Tests marked `slow` start processes, network namespaces or Docker; the rest are fast unit tests.
check: lint $(VENV)/.installed-dev
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A wheel for volunteers to `pip install` (dist/shoal-*.whl): one import package, `shoal`.
wheel: $(PY)
	$(PY) -m pip wheel --no-deps --wheel-dir dist .

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache dist build
