.PHONY: up test lint bench

## Install and start the whole system on embedded defaults with the synthetic demo study.
up:
	bash scripts/up.sh

## Install what the tests need (Debian peers, Python extras) and run the whole suite.
test:
	bash scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/mypy && .venv/bin/lint-imports

## Run every benchmark against its peer (DCMTK, DIPY, scikit-learn, a bare Flask app); see docs/benchmarks.md.
bench:
	.venv/bin/python benchmarks/bench_ingest.py --repeats 3
	.venv/bin/python benchmarks/bench_latency.py --runs 3 --send study
	.venv/bin/python benchmarks/bench_dki.py
	.venv/bin/python benchmarks/bench_onnx.py
	.venv/bin/python benchmarks/bench_hooks.py --duration 10 --rounds 3
