# Two entry points for users: `make demo` and `make test`. Both run the idempotent set-up first.
VENV := .venv
BIN := $(VENV)/bin
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test test-fast bench lint clean

setup:
	@bash env/setup.sh

demo: setup
	$(BIN)/scoreda demo --out demo_out

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not mpi and not slurm"

bench: setup
	$(BIN)/scoreda bench --json bench_out/bench.json

lint: setup
	$(BIN)/ruff check kernels pipeline tests

clean:
	rm -rf demo_out bench_out .pytest_cache
