# Every target creates .venv if it is missing and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   ?= demo-data

.PHONY: test lint typecheck unit demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,hsm]'
	touch $(STAMP)

## make test: lint, format check, mypy --strict, then the whole test suite.
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

## make demo: the main job — a seeded multi-node simulation on local LMDB directories
## ($(DATA)/node-N), every invariant checked; prints the report ($(DATA)/report.md).
demo: $(STAMP)
	$(BIN)/python -m simulations --data-dir $(DATA) --nodes 4 --rounds 300 \
		--crash-every 250 --rotate-every 300 --seed 1

## make bench: every benchmark at full size (a few minutes; docs/performance.md).
## `make test` runs them at tiny size (tests/benchmarks), asserting no speed.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(DATA) .mypy_cache .ruff_cache .pytest_cache .hypothesis
