# Every target bootstraps its own .venv, so a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all bench docs install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,cluster,docs]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fpx run configs/quickstart.py --progress

# Two worker processes: the suite is bound by XLA compilation, one core each.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -n 2 --durations=20 tests
	$(PY) -m pytest -q --nbmake notebooks

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 tests
	$(PY) -m pytest -q --nbmake notebooks

# The documentation site, built strictly (a broken link or a missing API reference fails).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache site
