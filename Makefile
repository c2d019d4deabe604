# labkit: two commands.   make lab   |   make test
# Everything else is a step those two call, or a convenience.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NB_CELL_TIMEOUT ?= 240
# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test quick setup system browser venv lint bench doctor clean help

help:
	@echo "make lab    - set everything up and open JupyterLab on notebooks/"
	@echo "make test   - set everything up and run the whole suite (tests + every notebook)"
	@echo "make quick  - lint + the unit tier (no process started; seconds)"
	@echo "make lint   - ruff"
	@echo "make bench  - cluster start-up benchmark"
	@echo "make doctor - what labkit finds on this machine"
	@echo "make clean  - remove the virtualenv and generated data"

setup: venv system

system:
	@VENV=$(VENV) bash scripts/system-deps.sh

# the browser test's Chromium (make test only; a learner's `make lab` does not need it)
browser:
	@VENV=$(VENV) WITH_BROWSER=1 bash scripts/system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

lab: setup
	$(PY) -m labkit.cli doctor --quiet
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_FLAGS)

test: setup browser
	$(PY) -m labkit.cli doctor --quiet
	$(VENV)/bin/ruff check labkit tests bench
	$(PY) -m pytest tests -v -n 2 --durations=25 --nb-cell-timeout=$(NB_CELL_TIMEOUT)
	cd examples/my_tasks && $(abspath $(PY)) -m pytest -q  # a project using only the pytest plugin

quick: venv
	$(VENV)/bin/ruff check labkit tests bench
	$(PY) -m pytest tests -q -m "not cluster and not notebook"

lint: venv
	$(VENV)/bin/ruff check labkit tests bench

bench: setup
	$(PY) bench/cluster_start.py
	$(PY) bench/define_task.py

doctor: venv
	$(PY) -m labkit.cli doctor

clean:
	rm -rf $(VENV) data/generated .pytest_cache .ruff_cache
