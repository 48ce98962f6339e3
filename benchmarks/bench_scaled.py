"""Studies per hour with one worker process and with two, on SQLite vs PostgreSQL, one run.

Each configuration is a fresh system of real processes (``her2low node``, ``service``, N ×
``worker`` with one thread each): the embedded default (SQLite databases, Huey on SQLite) and
scaled mode (PostgreSQL for both databases, Huey on Redis; real servers from Debian's packages,
started here on free loopback ports and stopped at the end). The same synthetic studies are
sent over 4 concurrent associations (SEG first); the clock runs from the first instance
received to the last diffusion series published, read from the node database. Prints the
figures, the two-worker / one-worker ratio per database (how far two processes scale on this
machine's 2 cores) and the PostgreSQL / SQLite ratio per worker count.

    .venv/bin/python benchmarks/bench_scaled.py [--studies 8] [--matrix 32x64] [--slices 4]

Loopback only; every process and server is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parent),
]

from _local import PY, free_port, wait_port  # noqa: E402

from tests.scaled_servers import Postgres, Redis, postgres_server, redis_server  # noqa: E402
from tests.system import popen_group, stop_group  # noqa: E402

ASSOCIATIONS = 4


def make_studies(folder: Path, count: int, matrix: tuple[int, int], slices: int) -> list[Any]:
    from dicom_node.synth import write_study

    def one(k: int) -> Any:
        return write_study(folder / f"s{k:02d}", seed=500 + k, matrix=matrix, slices=slices)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(count)))


def study_files(folder: Path, manifest: Any) -> list[Path]:
    return [folder / f for part in (manifest.seg, manifest.dwi, manifest.t2) for f in part.files]


def run_once(
    label: str,
    workers: int,
    studies: list[tuple[Path, Any]],
    work: Path,
    *,
    pg: Postgres | None,
    rd: Redis | None,
) -> float:
    """One configuration; returns studies per hour."""
    from her2low.scu import send_files

    home = work / f"{label}-{workers}w"
    home.mkdir()
    cds_port, node_port = free_port(), free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_NODE_HOST": "127.0.0.1",
        "HER2LOW_NODE_PORT": str(node_port),
        "HER2LOW_NODE_QUIET_SECONDS": "2",
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_NODE_RESULTS_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_RESULTS_API_TOKEN": secrets.token_urlsafe(24),
        "HER2LOW_REVIEW_SECRET_KEY": secrets.token_urlsafe(24),
        "HER2LOW_CDS_AUTH_REQUIRED": "false",
        "HER2LOW_WORKER_COUNT": "1",
        "HER2LOW_NODE_METRICS_PORT": "0",  # side ports off: several workers on one host
        "HER2LOW_WORKER_METRICS_PORT": "0",
    }
    if pg is not None and rd is not None:
        env["HER2LOW_NODE_DB_URL"] = pg.create_database(f"node_{workers}")
        env["HER2LOW_CDS_DB_URL"] = pg.create_database(f"cds_{workers}")
        env["HER2LOW_QUEUE_URL"] = rd.url(workers)
    node_url = env.get("HER2LOW_NODE_DB_URL") or f"sqlite:///{(home / 'node.db').resolve()}"
    upgraded = subprocess.run(
        [PY, "-m", "her2low", "db", "upgrade"], env=env, capture_output=True, text=True
    )
    if upgraded.returncode != 0:
        raise RuntimeError(upgraded.stderr)
    procs = []
    try:
        for name in ["service", "node"] + ["worker"] * workers:
            with open(home / f"{name}.log", "ab") as log:
                procs.append(
                    popen_group([PY, "-m", "her2low", name], env=env, stdout=log, stderr=log)
                )
        wait_port(cds_port, 90)
        wait_port(node_port, 90)
        shards = [studies[k::ASSOCIATIONS] for k in range(ASSOCIATIONS)]

        def send(k: int) -> None:
            for folder, manifest in shards[k]:
                report = send_files(
                    study_files(folder, manifest), "127.0.0.1", node_port, calling_aet=f"MOD{k}"
                )
                if report.failed:
                    raise RuntimeError(f"refused: {report.failed}")

        with ThreadPoolExecutor(ASSOCIATIONS) as pool:
            list(pool.map(send, range(ASSOCIATIONS)))
        uids = [manifest.dwi.series_instance_uid for _, manifest in studies]
        deadline = time.monotonic() + 1800
        while True:
            (done,) = _count_done(node_url, uids)
            if done == len(uids):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label} {workers}w: only {done}/{len(uids)} analysed")
            time.sleep(0.5)
        first, last = _span(node_url, uids)
        return len(uids) / (last - first) * 3600.0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            stop_group(proc, timeout=15)


def _count_done(url: str, uids: list[str]) -> tuple[int]:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from dicom_node.db import Job, JobState
    from her2low.core.database import make_engine

    engine = make_engine(url)
    try:
        with Session(engine) as s:
            n = s.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.state == JobState.DONE,
                    Job.result_id != "",
                    Job.series_instance_uid.in_(uids),
                )
            )
            return (int(n or 0),)
    finally:
        engine.dispose()


def _span(url: str, uids: list[str]) -> tuple[float, float]:
    """First instance received (any series of the studies) to the last result published."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from dicom_node.db import Instance, Job, JobState
    from her2low.core.database import make_engine

    engine = make_engine(url)
    try:
        with Session(engine) as s:
            first = s.scalar(select(func.min(Instance.received_at)))
            last = s.scalar(
                select(func.max(Job.updated_at)).where(
                    Job.state == JobState.DONE, Job.series_instance_uid.in_(uids)
                )
            )
            assert first is not None and last is not None
            return float(first), float(last)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--matrix", default="32x64", help="rows x columns of the synthetic study")
    parser.add_argument("--slices", type=int, default=4)
    args = parser.parse_args(argv)
    rows, cols = (int(v) for v in args.matrix.split("x"))
    figures: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="her2low-bench-scaled-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        made = make_studies(work / "studies", args.studies, (rows, cols), args.slices)
        studies = [(work / "studies" / f"s{k:02d}", m) for k, m in enumerate(made)]
        pg = stack.enter_context(postgres_server())
        rd = stack.enter_context(redis_server())
        for label, servers in (("sqlite", (None, None)), ("postgresql", (pg, rd))):
            for workers in (1, 2):
                started = time.monotonic()
                rate = run_once(label, workers, studies, work, pg=servers[0], rd=servers[1])
                figures[(label, workers)] = rate
                print(
                    f"{label:10s} {workers} worker(s): {rate:8.0f} studies/h "
                    f"({args.studies} studies {rows}x{cols}x{args.slices}, "
                    f"{time.monotonic() - started:.0f} s wall, load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    print()
    for label in ("sqlite", "postgresql"):
        print(f"{label:10s} 2 workers / 1 worker: {figures[(label, 2)] / figures[(label, 1)]:.2f}x")
    for workers in (1, 2):
        ratio = figures[("postgresql", workers)] / figures[("sqlite", workers)]
        print(f"{workers} worker(s) PostgreSQL / SQLite: {ratio:.2f}x")
    print(json.dumps({f"{k[0]}-{k[1]}w": round(v, 1) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
