# Two commands set up and test everything on a fresh machine: `make install`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint typecheck unit bench demo dist clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'

test: lint typecheck unit

lint:
	$(BIN)/ruff check casstore tests benchmarks demo
	$(BIN)/ruff format --check casstore tests benchmarks demo

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/pytest -n 2 --durations=15

bench:
	$(BIN)/python -m benchmarks.bench_store
	$(BIN)/python -m benchmarks.bench_compile
	$(BIN)/python -m benchmarks.bench_gc
	$(BIN)/python -m benchmarks.bench_load
	$(BIN)/python -m benchmarks.bench_s3_clients
	$(BIN)/python -m benchmarks.bench_s3
	$(BIN)/python -m benchmarks.bench_compression

demo:
	$(BIN)/python -m demo.run_demo

# The sdist and the wheel (dist/casstore-0.1.0-py3-none-any.whl) to install elsewhere:
# pip install 'dist/casstore-0.1.0-py3-none-any.whl[cli]'. Builds with the venv's
# setuptools, so it needs no index.
DIST ?= dist
dist:
	rm -rf $(DIST)
	$(BIN)/python -m build --no-isolation --outdir $(DIST) .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
