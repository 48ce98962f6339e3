"""Latency: last instance acknowledged → features published, on embedded defaults.

Starts ``her2low db upgrade``, then ``her2low node``, ``worker`` and ``service`` as processes on
free loopback ports with a short quiet period; writes a synthetic breast DKI study (40 slices ×
6 b-values DWI, plus its T2 and tumour SEG) with :func:`dicom_node.synth.write_study`; sends it
with DCMTK ``storescu`` (TCP_NODELAY=1), as a PACS routing the study would, or only the DWI
series (``--send dwi``: automatic ROI, no SEG); and watches the node database's ``jobs`` table
every 10 ms. Reported, per run:

- ``latency``: job finished (features published) − the series' last instance indexed (the
  instant its C-STORE is acknowledged), as the worker records it (``jobs.latency_seconds``);
- ``− quiet``: the same minus the quiet period, i.e. what the system adds;
- breakdown: promotion delay (housekeeping tick), queue wait (job queued → seen running),
  deferred (first run → last run: the job waited, e.g. for a SEG of the study, and was
  retried by the queue), run (last running → done), and, re-running the same work in this
  process on the stored files, read+assemble and fit+features; publish+bookkeeping is the
  rest of ``run``.

By default a small study is sent and analysed first, so that the measured series meets warm
processes (imports, caches); ``--cold`` measures the very first series instead.

    .venv/bin/python benchmarks/bench_latency.py [--runs 3] [--quiet 2] [--send study|dwi] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import PY, free_port, wait_port


@dataclass
class JobTrace:
    """Each state change of a job as seen by polling (state, wall clock), and its last row."""

    changes: list[tuple[str, float]] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)

    def first(self, state: str, default: float) -> float:
        return next((t for s, t in self.changes if s == state), default)

    def last(self, state: str, default: float) -> float:
        return next((t for s, t in reversed(self.changes) if s == state), default)


def watch_jobs(db: Path, series_uid: str, timeout: float) -> JobTrace:
    """Poll the jobs table until a job of ``series_uid`` is done with a result."""
    trace: dict[str, JobTrace] = {}
    deadline = time.monotonic() + timeout
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        while time.monotonic() < deadline:
            now = time.time()
            try:
                rows = conn.execute(
                    "SELECT * FROM jobs WHERE series_instance_uid = ?", (series_uid,)
                ).fetchall()
            except sqlite3.OperationalError:
                rows = []
            for row in rows:
                t = trace.setdefault(row["id"], JobTrace())
                state = str(row["state"]).lower()  # stored as the enum name
                if not t.changes or t.changes[-1][0] != state:
                    t.changes.append((state, now))
                t.row = dict(row)
                if state == "done" and row["result_id"]:
                    return t
                if state == "failed":
                    raise RuntimeError(f"job failed: {row['error']}")
            time.sleep(0.01)
    finally:
        conn.close()
    raise TimeoutError(f"no published result for {series_uid}; seen {trace}")


def series_row(db: Path, series_uid: str) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            "SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,)
        ).fetchone()
        return dict(row)
    finally:
        conn.close()


def offline_stages(env: dict[str, str], dwi_uid: str, with_seg: bool) -> dict[str, float]:
    """Read+assemble and fit+features of the stored series, timed in this process."""
    os.environ.update(env)
    import pydicom

    from dicom_node.analysis.series_analysis import analyse
    from dicom_node.db import Instance, Series
    from dicom_node.processes import pipeline_settings
    from dicom_node.series.assemble import assemble_dwi
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    settings = load_settings()
    config = pipeline_settings(settings)
    sessions = session_factory(make_engine(settings.node_database_url))
    with sessions() as session:
        from sqlalchemy import select

        paths = list(
            session.scalars(
                select(Instance.path).where(
                    Instance.series_instance_uid == dwi_uid, Instance.current.is_(True)
                )
            )
        )
        seg_uids = list(
            session.scalars(select(Series.series_instance_uid).where(Series.modality == "SEG"))
        )
        seg_paths = list(
            session.scalars(select(Instance.path).where(Instance.series_instance_uid.in_(seg_uids)))
        )
    started = time.perf_counter()
    datasets = [pydicom.dcmread(p) for p in paths]
    dwi = assemble_dwi(datasets)
    assembled = time.perf_counter()
    segs = [pydicom.dcmread(p) for p in seg_paths] if with_seg else []
    analyse(dwi, segs=segs, settings=config.analysis)
    fitted = time.perf_counter()
    return {"read_assemble": assembled - started, "fit_features": fitted - assembled}


@dataclass(frozen=True)
class Prepared:
    folders: list[str]
    dwi_uid: str
    images: int


def prepare(out: Path, send: str, *, seed: int, slices: int, matrix: tuple[int, int]) -> Prepared:
    """Write a synthetic study; the folders to send (DWI, or DWI + SEG + T2)."""
    import pydicom

    from dicom_node.synth import write_study

    manifest = write_study(out, seed=seed, slices=slices, matrix=matrix)
    files = list(manifest.dwi.files)
    if send == "study":
        files += [*manifest.t2.files, *manifest.seg.files]
    first = pydicom.dcmread(out / manifest.dwi.files[0], stop_before_pixels=True)
    return Prepared(
        folders=[str(out / f) for f in sorted({Path(f).parent for f in files})],  # dwi, seg, t2
        dwi_uid=str(first.SeriesInstanceUID),
        images=len(files),
    )


def storescu(port: int, folders: list[str], env: dict[str, str]) -> None:
    sent = subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", "HER2LOW", "-xe", "-R", "+sd", "+r",
         "127.0.0.1", str(port), *folders],
        capture_output=True, text=True, env={**env, "TCP_NODELAY": "1"},
    )  # fmt: skip
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed:\n{sent.stderr[-2000:]}")


def one_run(args: argparse.Namespace, index: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    home = work / "home"
    measured = prepare(work / "study", args.send, seed=100 + index, slices=40, matrix=(96, 192))
    node_port, cds_port = free_port(), free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_NODE_HOST": "127.0.0.1",
        "HER2LOW_NODE_PORT": str(node_port),
        "HER2LOW_NODE_QUIET_SECONDS": str(args.quiet),
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_NODE_RESULTS_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_LOG_LEVEL": "INFO",
    }
    home.mkdir(parents=True)
    subprocess.run([PY, "-m", "her2low", "db", "upgrade"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    procs = []
    for name in ("service", "worker", "node"):
        log = open(home / f"{name}.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen([PY, "-m", "her2low", name], env=env, stdout=log,
                                      stderr=log))  # fmt: skip
    try:
        wait_port(cds_port)
        wait_port(node_port)
        if args.warm:  # a small study first, so the measured one meets warm processes
            warm = prepare(work / "warm", args.send, seed=900 + index, slices=4, matrix=(32, 64))
            storescu(node_port, warm.folders, env)
            watch_jobs(home / "node.db", warm.dwi_uid, timeout=180)
        else:
            time.sleep(1.0)  # let the worker's consumer start polling
        sent_at = time.time()
        storescu(node_port, measured.folders, env)
        acked_at = time.time()
        trace = watch_jobs(home / "node.db", measured.dwi_uid, timeout=180)
        series = series_row(home / "node.db", measured.dwi_uid)
        row = trace.row
        last = float(series["last_received_at"])
        created = float(row["created_at"])
        first_run = trace.first("running", created)
        last_run = trace.last("running", created)
        done = trace.first("done", float(row["updated_at"]))
        result = {
            "images_sent": measured.images,
            "send_seconds": acked_at - sent_at,
            "latency": float(row["latency_seconds"]),
            "minus_quiet": float(row["latency_seconds"]) - args.quiet,
            "promotion_delay": created - last - args.quiet,
            "queue_wait": first_run - created,
            "deferred": last_run - first_run,
            "run": done - last_run,
            "attempts": int(row["attempts"]),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update(offline_stages(env, measured.dwi_uid, with_seg=args.send == "study"))
    result["publish_and_bookkeeping"] = (
        result["run"] - result["read_assemble"] - result["fit_features"]
    )
    result["home"] = str(home)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0, help="node quiet period, s")
    parser.add_argument("--send", choices=["study", "dwi"], default="study")
    parser.add_argument("--json", action="store_true", help="print every run as JSON too")
    parser.add_argument(
        "--cold",
        dest="warm",
        action="store_false",
        help="measure the first series the processes see (imports and caches cold)",
    )
    args = parser.parse_args()
    runs = [one_run(args, i) for i in range(args.runs)]
    keys = ["latency", "minus_quiet", "promotion_delay", "queue_wait", "deferred", "run",
            "read_assemble", "fit_features", "publish_and_bookkeeping", "send_seconds"]  # fmt: skip
    print(f"quiet period {args.quiet:g} s, {'warm' if args.warm else 'cold'}, sent: {args.send} "
          f"({runs[0]['images_sent']} images; DWI 40 slices x 6 b), runs: {args.runs}")  # fmt: skip
    print(f"{'stage':26s} " + " ".join(f"run{i + 1:>2d}" for i in range(len(runs))) + "  median")
    for key in keys:
        values = [r[key] for r in runs]
        cells = " ".join(f"{v:6.2f}" for v in values)
        print(f"{key:26s} {cells}  {statistics.median(values):6.2f}")
    print("attempts: " + ", ".join(str(r["attempts"]) for r in runs))
    if args.json:
        print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
