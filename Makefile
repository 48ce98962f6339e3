.PHONY: up test lint bench

## Install and start the whole system on embedded defaults with the synthetic demo study.
up:
	bash scripts/up.sh

## Install what the tests need (Debian peers, Python extras) and run the whole suite.
test:
	bash scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/mypy

bench:
	.venv/bin/python benchmarks/run_all.py
