"""ONNX inference latency and throughput vs scikit-learn, on the shipped reference model.

Run: ``.venv/bin/python benchmarks/bench_onnx.py`` (options: ``--single N``, ``--batch N``,
``--variant combined|descriptors|quantitative``). Goals: <= 0.2 ms per case, >= 100,000 cases/s
in batch. The scikit-learn pipeline is refitted on the same simulated cohort with the card's
inputs (it is the same model: the check below asserts the probabilities agree).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.build_reference import REFERENCE_SEED
from models.data import Cohort
from models.estimator import Her2LowClassifier
from models.prediction import ModelVariant
from models.runtime import ModelRuntime
from models.schema import FEATURE_NAMES, validate_inputs
from models.simulate import simulate_cohort
from models.training import ModelInfo, TrainingConfig, train_and_save


def _time_per_call(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Median and 95th percentile seconds per call over ``n`` calls (after warm-up)."""
    for _ in range(min(200, n)):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def _throughput(fn: Callable[[], object], n_cases: int, repeats: int = 3) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n_cases / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--single", type=int, default=5000, help="single-case calls to time")
    parser.add_argument("--batch", type=int, default=100_000, help="cases per batch")
    parser.add_argument("--variant", default="combined", choices=[v.value for v in ModelVariant])
    parser.add_argument(
        "--all-features",
        action="store_true",
        help="benchmark a combined model on all 30 inputs (trained here) instead of the reference",
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.all_features:
        args.variant = "combined"
        cohort0 = Cohort.from_records(simulate_cohort(REFERENCE_SEED))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_and_save(
                cohort0,
                Path(tmp.name),
                TrainingConfig(features=FEATURE_NAMES, n_bootstrap=10, cv_folds=2),
                ModelInfo(name="bench-all-features"),
            )
        runtime = ModelRuntime.load(Path(tmp.name))
    else:
        runtime = ModelRuntime.load()
    model = runtime.model(args.variant)
    inputs = model.inputs
    cohort = Cohort.from_records(simulate_cohort(REFERENCE_SEED))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = Her2LowClassifier(inputs).fit(cohort.matrix(inputs), cohort.y)
    pipe = sk.pipeline_

    # Cases: the simulated lesions, with every schema feature (as the service would pass them).
    rows = [validate_inputs(r) for r in (dict(r) for r in cohort.rows)]
    eligible = [r for r in rows if model.eligible(r)]
    case = eligible[0]
    raw_case = {k: v for k, v in case.items() if v != "" and v == v}  # what a caller sends
    feed1 = model.feed([case])
    X1 = cohort.matrix(inputs)[:1]
    X1[0] = [case[n] for n in inputs]

    onnx_p = model.run([case])[0]
    sk_p = pipe.predict_proba(X1)[0]
    assert np.max(np.abs(onnx_p - sk_p)) < 1e-5, (onnx_p, sk_p)

    name = model.entry.name
    print(f"# bench_onnx: {name} {args.variant}, {len(inputs)} graph inputs")
    print(
        f"# {platform.python_version()} {platform.machine()} cpus={os.cpu_count()}, "
        "onnxruntime 1 intra-op thread"
    )
    n = args.single
    t_rt = _time_per_call(lambda: runtime.predict(raw_case, variant=args.variant), n)
    t_run = _time_per_call(lambda: model.session.run(["probabilities"], feed1), n)
    t_sk = _time_per_call(lambda: pipe.predict_proba(X1), max(n // 5, 200))
    print("\nsingle case (median / p95, ms)")
    print(
        f"  ModelRuntime.predict (validate+run+explain) {t_rt[0] * 1e3:8.4f} / {t_rt[1] * 1e3:.4f}"
    )
    print(
        f"  session.run (raw ONNX)                     {t_run[0] * 1e3:8.4f} / {t_run[1] * 1e3:.4f}"
    )
    print(
        f"  sklearn Pipeline.predict_proba             {t_sk[0] * 1e3:8.4f} / {t_sk[1] * 1e3:.4f}"
    )
    print(f"  ratio sklearn / ModelRuntime.predict       {t_sk[0] / t_rt[0]:8.1f}x")
    print(f"  ratio sklearn / session.run                {t_sk[0] / t_run[0]:8.1f}x")

    reps = -(-args.batch // len(eligible))
    batch_rows = (eligible * reps)[: args.batch]
    feed = model.feed(batch_rows)
    Xb = np.empty((len(batch_rows), len(inputs)), dtype=object)
    for j, name in enumerate(inputs):
        Xb[:, j] = [r[name] for r in batch_rows]
    n_b = len(batch_rows)
    thr_run = _throughput(lambda: model.session.run(["probabilities"], feed), n_b)
    thr_sk = _throughput(lambda: pipe.predict_proba(Xb), n_b)
    sub = batch_rows[: min(n_b, 20_000)]
    raw_sub = [{k: v for k, v in r.items() if v != "" and v == v} for r in sub]
    thr_rt = _throughput(lambda: runtime.predict_batch(raw_sub, variant=args.variant), len(sub))
    print(f"\nbatch throughput (cases/s; {n_b} cases, predict_batch on {len(sub)})")
    print(f"  session.run (raw ONNX, feed prebuilt)      {thr_run:12,.0f}")
    print(f"  ModelRuntime.predict_batch (full)          {thr_rt:12,.0f}")
    print(f"  sklearn Pipeline.predict_proba             {thr_sk:12,.0f}")
    print(f"  ratio session.run / sklearn                {thr_run / thr_sk:12.1f}x")
    print(f"  ratio predict_batch / sklearn              {thr_rt / thr_sk:12.2f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
