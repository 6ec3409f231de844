# crm-jax: two commands on a fresh machine: `make demo`, then `make test` (`make test-fast` while
# editing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
TESTDEPS := $(VENV)/.test-installed

.PHONY: install install-test demo test test-fast clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(TESTDEPS): requirements-test.txt $(RUNTIME)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(RUNTIME)
install-test: $(TESTDEPS)

# Refines the bundled BIG-style images with the bundled checkpoint.
demo: $(RUNTIME)
	$(PY) -m crm_jax.cli.demo

test: $(TESTDEPS)
	$(PY) -m pytest -q tests

# The edit loop: no PyTorch, no slow test (tests/conftest.py marks them).
test-fast: $(TESTDEPS)
	$(PY) -m pytest -q -m "not torch and not slow" tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache
