# templatetool — make demo | make test | make lint | make bench | make fuzz
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup deps test test-all demo bench fuzz lint clean

$(STAMP): pyproject.toml setup.py templatetool/_xts.c
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

deps:
	./tools/install-debian-deps.sh

setup: deps $(STAMP)

test: setup
	$(VPY) -m pytest -q -m "not slow and not fuzz" tests

test-all: setup
	$(VPY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check templatetool
	$(VENV)/bin/ruff format --check templatetool
	$(VENV)/bin/mypy

demo: setup
	./tools/demo.sh

BENCH_ARGS ?= --only goals,hgs --size-mib 1024
bench: setup
	$(VPY) bench/run.py $(BENCH_ARGS)

fuzz: setup
	$(VPY) -m pip install -q -e '.[fuzz]'
	$(VPY) tools/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
