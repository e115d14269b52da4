# Two commands on a fresh machine:
#   make run   - create .venv if missing, then execute every notebook (quick mode unless CROWD_QUICK=0)
#   make test  - create .venv if missing, then the unit tests and every notebook under nbval
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CROWD_QUICK ?= 1
export CROWD_QUICK
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: run test unit notebooks venv lint clean-generated help

help:
	@echo "make run    execute the notebook series into build/notebooks (CROWD_QUICK=0 for full size)"
	@echo "make test   unit tests + every notebook under nbval, in quick mode"
	@echo "make lint   ruff over helpers, tests and benchmarks"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install --quiet -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	@touch $(STAMP)

run: $(STAMP)
	@mkdir -p build/notebooks
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb (CROWD_QUICK=$(CROWD_QUICK))"; start=$$(date +%s); \
	  $(PY) -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	    --ExecutePreprocessor.kernel_name=python3 --output-dir build/notebooks "$$nb" || exit 1; \
	  echo "   took $$(( $$(date +%s) - start )) s"; \
	done

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --durations=5 -p no:cacheprovider $(NOTEBOOKS)

unit: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check helpers tests benchmarks

clean-generated:
	rm -rf build runs data/synthetic report/figures/*.png report/figures/*.pdf
