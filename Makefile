# ctstream: `make demo` and `make test` work on a fresh Debian 12 machine (as
# root); both run scripts/setup.sh first, which is quick when nothing is missing.

VENV := .venv
PY   := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ctstream demo

# Extra pytest arguments: make test PYTEST_ARGS='-k ringbuf -x'
test: setup
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
