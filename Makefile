# The one entry point: `make demo` runs the dashboard example, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test docs bench bench-quick lint clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . fastlite httpx
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.bench: pyproject.toml $(VENV)/.dev
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

## demo: the "Background Task Dashboard" example (http://127.0.0.1:5001) with its slow service
demo: $(VENV)/.base
	$(PY) examples/demo.py

## test: the whole suite; starts Redis if none answers and installs Chromium when missing
test: $(VENV)/.dev
	PY=$(PY) bash scripts/test.sh $(ARGS)

## docs: the documentation site in site/ (offline; strict: any warning fails the build)
docs: $(VENV)/.dev
	$(VENV)/bin/mkdocs build --strict --clean

## bench: peers side by side (QUICK=1 for the short run)
bench: $(VENV)/.bench
	PY=$(PY) bash scripts/bench.sh $(if $(QUICK),--quick,)

bench-quick:
	$(MAKE) bench QUICK=1

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check fh_tasks tests examples bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache site dist fh_tasks.db fh_tasks.db-* dashboard.db dashboard.db-* \
		dashboard_jobs.db dashboard_jobs.db-* counter.db counter.db-* signup.db signup.db-* \
		progress_jobs.db progress_jobs.db-*
