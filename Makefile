# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf runs data/demo .pytest_cache
