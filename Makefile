# The two commands of the README: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test demo test lint bench

setup:
	scripts/bootstrap.sh

setup-test:
	scripts/bootstrap.sh --for-tests

demo: setup
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(VENV)/bin/mim demo --out $${OUT:-runs/demo}

test: setup-test
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -ra --durations=25 -n 2 --dist loadfile tests

lint: setup
	$(VENV)/bin/ruff check mim pipelines tests benchmarks examples
