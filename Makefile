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

.PHONY: run test unit notebooks venv lint report size clean-generated help

help:
	@echo "make run    execute the notebook series into build/notebooks (CROWD_QUICK=0 for full size)"
	@echo "make test   unit tests + every notebook under nbval, in quick mode"
	@echo "make report assemble report/report.md and the figure sheet from report/"
	@echo "make lint   ruff over helpers, tests and benchmarks"
	@echo "make size   lines of the core a student reads (helpers/*.py) and its longest function"

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
	@fail=0; times=""; series=$$(date +%s); \
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb (nbval, CROWD_QUICK=$(CROWD_QUICK))"; start=$$(date +%s); \
	  $(PY) -m pytest -q --nbval-lax --nbval-current-env --durations=3 -p no:cacheprovider "$$nb" || fail=1; \
	  times="$$times$$(printf '%6d s  %s' $$(( $$(date +%s) - start )) "$$nb")\n"; \
	done; \
	echo "Notebook run times (quick mode = $(CROWD_QUICK)):"; printf "$$times"; \
	echo "$$(printf '%6d' $$(( $$(date +%s) - series ))) s  whole series"; \
	exit $$fail

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
