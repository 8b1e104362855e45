# fsar: make install, make test (test-fast: without the slow end-to-end tests), make extract DATASET=..., make demo, make bench
PY ?= .venv/bin/python
VENV_BIN := .venv/bin
DATASET ?= hmdb51
DATA_ROOT ?= data/$(DATASET)
STORE ?= stores/$(DATASET)
ARGS ?=

export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast lint format extract demo bench bench-quick clean

install:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"

test:
	HF_HUB_OFFLINE=1 $(VENV_BIN)/pytest -q -x --durations=15

test-fast:
	HF_HUB_OFFLINE=1 $(VENV_BIN)/pytest -q -x --durations=15 -m "not slow"

lint:
	$(VENV_BIN)/ruff check .
	$(VENV_BIN)/ruff format --check .

format:
	$(VENV_BIN)/ruff format .
	$(VENV_BIN)/ruff check --fix .

extract:
	$(VENV_BIN)/fsar-extract --dataset $(DATASET) --data-root $(DATA_ROOT) --store $(STORE) $(ARGS)

demo:
	$(PY) -m examples.demo $(ARGS)

bench:
	$(PY) -m bench.run_all $(ARGS)

bench-quick:
	$(PY) -m bench.run_all --quick $(ARGS)

clean:
	rm -rf demo bench/results .pytest_cache
