# Two commands on a fresh machine (both are tasks.py, which also runs without make, e.g. on Windows):
#   make run   - create .venv if missing, then execute every notebook (quick mode unless CROWD_QUICK=0)
#   make test  - create .venv if missing, then the unit tests and every notebook under nbval, and the
#                widget notebooks again with ipywidgets 7.7.1 (what Colab ships)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CROWD_QUICK ?= 1
export CROWD_QUICK

.PHONY: run test unit notebooks venv lint report size clean-generated help

help:
	@echo "make run    execute the notebook series into build/notebooks (CROWD_QUICK=0 for full size)"
	@echo "make test   unit tests + every notebook under nbval, in quick mode (widget notebooks also on ipywidgets 7.7.1)"
	@echo "make report assemble report/report.md and the figure sheet from report/"
	@echo "make lint   ruff over helpers, tests and benchmarks"
	@echo "make size   lines of the core a student reads (helpers/*.py) and its longest function"

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) tasks.py venv

run:
	$(PYTHON) tasks.py run

test:
	$(PYTHON) tasks.py test

report: $(STAMP)
	$(PY) -m helpers report

size:
	@$(or $(wildcard $(PY)),$(PYTHON)) -m helpers.tools.size

unit: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check helpers tests benchmarks

clean-generated:
	rm -rf build runs data/synthetic report/figures/*.png report/figures/*.pdf \
	  report/results.md report/results.json report/report.md
