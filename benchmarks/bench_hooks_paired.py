"""Ours against the minimal conformant peer in short back-to-back pairs (paired measurement).

``bench_hooks.py`` measures each app for 10 s in turn. On this shared machine the rate of the
same app moves by 15-20 % from one 10 s window to the next, and it does not move the same way
for both apps, so its per-round ratios spread from 0.6 to 1.1. Here both apps' gunicorns run
the whole time (a sync worker that gets no request sleeps in ``select``), and ``wrk`` loads them
in turn for ``--slice`` seconds each, ``--pairs`` times, alternating which goes first. Each pair
sees nearly the same machine, so the **median of the per-pair ratios** is what this script
reports, with its quartiles. The apps, tokens, body, warm-up, workers and connections are those
of ``bench_hooks.py``; a pair's tokens are minted just before it (they expire) and used by both
apps, each of which records them in its own jti table.

    .venv/bin/python benchmarks/bench_hooks_paired.py [--pairs 20] [--slice 3] [--postgres]
        [--imaging-prefetch] [--later-her2]

Needs ``wrk`` (Debian: apt-get install -y wrk). Loopback only; stops its servers by itself.
About 5 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import bench_hooks  # noqa: E402  (its sys.path set-up makes tests/ and the project importable)
from _local import free_port, wait_port  # noqa: E402

APPS = ("ours", "peer")


@dataclasses.dataclass(frozen=True)
class Slice:
    """One app's ``wrk`` run inside a pair."""

    rps: float
    p99_ms: float
    cpu_ms: float  # the workers' user + system CPU per request
    errors: int


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile); one value gives that value three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, mid, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, mid, high


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-pair ratios ours/peer, their quartiles, and each app's median slice figures."""

    ratios: list[float]
    ratio_quartiles: tuple[float, float, float]
    apps: dict[str, dict[str, float]]


def summarize(pairs: Sequence[dict[str, Slice]]) -> Summary:
    ratios = [p["ours"].rps / p["peer"].rps for p in pairs]
    apps = {
        name: {
            "rps": statistics.median(p[name].rps for p in pairs),
            "p99_ms": statistics.median(p[name].p99_ms for p in pairs),
            "cpu_ms": statistics.median(p[name].cpu_ms for p in pairs),
            "errors": float(sum(p[name].errors for p in pairs)),
        }
        for name in APPS
    }
    return Summary(ratios, quartiles(ratios), apps)


@contextlib.contextmanager
def _servers(
    env: dict[str, str], ports: dict[str, int], workers: int
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in APPS:
            app, chdir = bench_hooks.GUNICORN_APPS[name]
            procs[name] = bench_hooks._gunicorn(app, ports[name], workers, env, chdir, "sync", 1)
        for name in APPS:
            wait_port(ports[name])
            bench_hooks._wait_booted(ports[name])
        yield procs
    finally:
        for proc in procs.values():
            bench_hooks._stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--slice", type=int, default=3, help="seconds of wrk per app and pair")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers per app")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--tokens-per-thread", type=int, default=2500, help="per pair")
    parser.add_argument(
        "--postgres", action="store_true", help="both apps on a throwaway PostgreSQL"
    )
    parser.add_argument(
        "--imaging-prefetch",
        action="store_true",
        help="send the imaging prefetch the discovery asks for, naming the patient's MRI study",
    )
    parser.add_argument(
        "--later-her2",
        action="store_true",
        help="send a her2 prefetch holding a HER2 result dated after the MRI",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.pairs < 1 or args.slice < 1:
        print("--pairs and --slice must be at least 1", file=sys.stderr)
        return 2
    from test_cds_support import make_token

    pairs: list[dict[str, Slice]] = []
    with contextlib.ExitStack() as stack:
        ports = {name: free_port() for name in APPS}
        home, env, body, _ = bench_hooks.prepared_apps(stack, ports["ours"], postgres=args.postgres)
        if args.imaging_prefetch:
            body["prefetch"]["imaging"] = bench_hooks.imaging_prefetch()
        if args.later_her2:
            body["prefetch"]["her2"] = bench_hooks.later_her2_prefetch()
        raw_body = json.dumps(body).encode()
        aud = f"http://127.0.0.1:{ports['ours']}{bench_hooks.SERVICE_PATH}"
        tokens = home / "tokens"
        tokens.mkdir()
        (tokens / "body.json").write_text(json.dumps(body))
        procs = stack.enter_context(_servers(env, ports, args.workers))
        for name in APPS:  # warm-up: lazy imports, connections, the card cache
            warm = [make_token(aud, iss=bench_hooks.ISSUER, lifetime=280) for _ in range(40)]
            bench_hooks._python_load(ports[name], raw_body, warm, 1.0, 2)
        for index in range(args.pairs):
            bench_hooks._empty_jti_tables(env["HER2LOW_CDS_DB_URL"], env["BENCH_PEER_DB_URL"])
            bench_hooks._tokens(tokens, aud, args.threads, args.tokens_per_thread)
            pair: dict[str, Slice] = {}
            for name in APPS if index % 2 == 0 else APPS[::-1]:
                url = f"http://127.0.0.1:{ports[name]}{bench_hooks.SERVICE_PATH}"
                before = bench_hooks._workers_cpu(procs[name].pid)
                run = bench_hooks._wrk(url, tokens, args.slice, args.connections, args.threads)
                cpu = bench_hooks._workers_cpu(procs[name].pid) - before
                if run["requests"] >= args.threads * args.tokens_per_thread:
                    print("tokens ran out: raise --tokens-per-thread", file=sys.stderr)
                    return 1
                pair[name] = Slice(
                    run["rps"], run["p99_ms"], 1000 * cpu / max(run["requests"], 1), run["errors"]
                )
            pairs.append(pair)
            print(
                f"pair {index + 1:2}: "
                + "  ".join(f"{n} {pair[n].rps:5.0f}/s p99 {pair[n].p99_ms:5.1f}" for n in APPS)
                + f"  ratio {pair['ours'].rps / pair['peer'].rps:.2f}",
                flush=True,
            )
    summary = summarize(pairs)
    low, mid, high = summary.ratio_quartiles
    apps = summary.apps
    database = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"\n{args.pairs} pairs of {args.slice} s, {args.connections} connections, "
        f"{args.workers} sync workers per app, {database}"
    )
    for name in APPS:
        a = apps[name]
        print(
            f"  {name}: median {a['rps']:.0f} req/s, p99 {a['p99_ms']:.1f} ms, "
            f"{a['cpu_ms']:.2f} ms CPU per request, {a['errors']:.0f} errors"
        )
    print(f"  ours / peer per pair: median {mid:.2f} (quartiles {low:.2f}-{high:.2f})")
    goals = {
        "throughput >= 0.9x conformant peer (median pair)": mid >= 0.9,
        "p99 <= 50 ms (ours, median slice)": apps["ours"]["p99_ms"] <= 50,
        "zero errors": all(apps[n]["errors"] == 0 for n in APPS),
    }
    for goal, met in goals.items():
        print(f"  {'met   ' if met else 'MISSED'} {goal}")
    print("JSON " + json.dumps({**dataclasses.asdict(summary), "goals": goals}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
