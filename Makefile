# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
# `make test` (CI) lints and runs the whole suite; `make test-fast` skips the tests marked slow, for the edit loop.
PY := .venv/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions

.PHONY: setup demo test test-fast test-gpu lint bench image-check clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup lint
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

# The GPU tier: correctness on CUDA (tests marked gpu; each skips where no GPU is visible).
test-gpu:
	$(PY) -m pytest -q -m gpu -p no:cacheprovider

# The Docker image built with buildah and run (not in CI: it downloads several GB; docs/cluster.md).
image-check:
	@bash scripts/image_check.sh

lint:
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf runs data/demo .pytest_cache
