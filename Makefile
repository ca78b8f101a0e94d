# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
# `make test` (CI) lints and runs the whole suite; `make test-fast` skips the tests marked slow, for the edit loop.
PY := .venv/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions

.PHONY: setup demo test test-fast lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup lint
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf runs data/demo .pytest_cache
