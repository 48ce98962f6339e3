"""Count the CPU instructions one hook call costs, ours against the minimal conformant peer.

Wall-clock rates on a shared 2-core machine move by 10-20 % from one minute to the next (see
``docs/benchmarks.md``), more than the difference being looked for. An instruction count does
not: each app runs in-process (the WSGI callable, no HTTP server) under Valgrind's cachegrind,
once with no measured calls and once with ``--calls`` calls after the same start-up and
warm-up; each run's databases are prepared beforehand in a plain process (``_prepare_home``).
The difference divided by the calls is what one call costs in user-space instructions. Each
call is a real signed ES384 call with a fresh token (same checks, same card as
``bench_hooks.py``). ``--cache-sim`` adds cachegrind's cache model (first-level and last-level
misses per call), which is about twice as slow; ``--last-level KIB`` sizes its last-level
cache (Valgrind otherwise models the host's whole one); ``--branch-sim`` adds its branch
predictor model (conditional and indirect branches and their mispredictions).

Not counted: the kernel (syscalls) and time. Cache misses and mispredictions are modelled, not
timed. So this shows whether our code does more *work* than the peer, and how much more code and
data it touches, not how fast it runs.

    .venv/bin/python benchmarks/bench_hooks_instructions.py [--calls 400] [--cache-sim]
        [--last-level 1024] [--branch-sim]

Needs ``valgrind`` (Debian: apt-get install -y valgrind). About 8 minutes on 2 cores, 13 with
``--cache-sim``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import bench_hooks  # noqa: E402  (its sys.path set-up makes tests/ and the project importable)

WARM_UP = 100
#: what ``_prepare_home`` leaves for the counted process: its environment and hook body
PREPARED = "prepared.json"
APPS = ("peer", "ours")
#: cachegrind summary counters kept (instructions; with --cache-sim, cache misses; with
#: --branch-sim, conditional and indirect branches and their mispredictions)
COUNTERS = ("Ir", "I1mr", "ILmr", "D1mr", "DLmr", "D1mw", "DLmw", "Bc", "Bcm", "Bi", "Bim")


def _prepare_home(home: Path) -> None:
    """Migrate and fill one run's databases (outside Valgrind); env and body to ``prepared.json``.

    Counted under Valgrind, the set-up (migrations, 201 results posted and scored through ONNX
    Runtime) differed by over a billion instructions from one process to the next: the peer's
    per-call figure read 8.1 M in one run and 5.0 M in the next, which drowned the calls being
    measured. So each run's home is prepared in a plain process first, and the counted process
    only starts the app, mints tokens and calls; two runs then agree within 0.2 %.
    """
    env, body = bench_hooks.prepare_home(home, 8080)
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    (home / PREPARED).write_text(json.dumps({"env": changed, "body": body}))


def _inner(app_name: str, calls: int, tokens_total: int, home: Path) -> int:
    """Start one prepared app, warm it up, then run ``calls`` hook calls (measured by the parent)."""
    from test_cds_support import jwks, make_token
    from werkzeug.test import EnvironBuilder

    prepared = json.loads((home / PREPARED).read_text())
    os.environ.update(prepared["env"])
    # The test keys are made per process: trust this process's (an EC key costs the same work
    # every time; the RSA key, whose prime search is random, is not made, nor needed).
    (home / "jwks.json").write_text(json.dumps(jwks("es")))
    body = prepared["body"]
    if app_name == "peer":
        app = bench_hooks.peer_app()
    else:
        from cds_service.wsgi import app as factory

        app = factory()
    raw = json.dumps(body).encode()
    audience = f"http://127.0.0.1:8080{bench_hooks.SERVICE_PATH}"
    # the same number of tokens whatever ``calls`` is, so both runs' set-up is the same work
    tokens = iter(
        [make_token(audience, iss=bench_hooks.ISSUER, lifetime=280) for _ in range(tokens_total)]
    )
    base = EnvironBuilder(
        path=bench_hooks.SERVICE_PATH,
        method="POST",
        data=raw,
        headers={"Content-Type": "application/json", "Host": "127.0.0.1:8080"},
    ).get_environ()

    def call() -> None:
        environ = dict(base)
        environ["wsgi.input"] = io.BytesIO(raw)
        environ["HTTP_AUTHORIZATION"] = "Bearer " + next(tokens)
        status: list[str] = []

        def start_response(line: str, headers: Any, exc_info: Any = None) -> None:
            status.append(line)

        for _chunk in app(environ, start_response):
            pass
        if not status or not status[0].startswith("200"):
            raise RuntimeError(f"{app_name}: hook call answered {status}")

    for _ in range(WARM_UP + calls):
        call()
    return 0


def cachegrind_model(cache_sim: bool, last_level_kib: int | None, branch_sim: bool) -> list[str]:
    """cachegrind's model options: caches (a sized last level implies them), branch predictor.

    Valgrind sizes the last level like the host's (here a 32 MiB L3 that other guests share);
    a smaller one, e.g. the 1 MiB of L2 per core pair, shows what misses it when crowded.
    """
    if last_level_kib is not None and (
        last_level_kib < 64 or last_level_kib & (last_level_kib - 1)
    ):
        raise ValueError("--last-level must be a power of two, at least 64 (KiB)")
    model = [f"--cache-sim={'yes' if cache_sim or last_level_kib else 'no'}"]
    if last_level_kib:
        model.append(f"--LL={last_level_kib * 1024},16,64")
    if branch_sim:
        model.append("--branch-sim=yes")
    return model


def _counted(
    app_name: str, calls: int, tokens_total: int, model: list[str], keep: Path | None
) -> dict[str, int]:
    """Run ``_inner`` under cachegrind; its whole-process counters (its file kept in ``keep``)."""
    with tempfile.TemporaryDirectory(prefix="bench-instr-cg-") as tmp:
        out = (keep or Path(tmp)) / f"cachegrind.{app_name}.{calls}.out"
        home = Path(tmp) / "home"
        home.mkdir()
        subprocess.run(
            [sys.executable, __file__, "--prepare", str(home)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                *model,
                f"--cachegrind-out-file={out}",
                sys.executable,
                __file__,
                "--inner",
                app_name,
                str(calls),
                str(tokens_total),
                str(home),
            ],
            check=True,
            capture_output=True,
            timeout=3600,
        )
        text = out.read_text()
    events = re.search(r"^events: (.*)$", text, re.M)
    summary = re.search(r"^summary: (.*)$", text, re.M)
    if events is None or summary is None:
        raise RuntimeError("cachegrind wrote no summary")
    return dict(zip(events.group(1).split(), map(int, summary.group(1).split()), strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="measured calls per app")
    parser.add_argument("--cache-sim", action="store_true", help="also count cache misses")
    parser.add_argument(
        "--branch-sim", action="store_true", help="also count branch mispredictions"
    )
    parser.add_argument(
        "--last-level",
        type=int,
        metavar="KIB",
        help="model the last-level cache with this size (KiB, 16-way; implies --cache-sim): "
        "Valgrind takes the host's, which on a shared VM is far more than one process gets",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the four cachegrind files here (per function: cg_diff the 0-call file and "
        "the full one of an app, then cg_annotate the difference)",
    )
    parser.add_argument(
        "--inner", nargs=4, metavar=("APP", "CALLS", "TOKENS", "HOME"), help=argparse.SUPPRESS
    )
    parser.add_argument("--prepare", type=Path, metavar="HOME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        _prepare_home(args.prepare)
        return 0
    if args.inner:
        app_name, calls, tokens_total, home = args.inner
        return _inner(app_name, int(calls), int(tokens_total), Path(home))
    try:
        model = cachegrind_model(args.cache_sim, args.last_level, args.branch_sim)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 2
    if args.calls < 1:
        print("--calls must be at least 1", file=sys.stderr)
        return 2
    tokens_total = WARM_UP + args.calls
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    runs = [(name, calls) for name in APPS for calls in (0, args.calls)]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two Valgrind processes
            counted = dict(
                zip(
                    runs,
                    pool.map(lambda run: _counted(*run, tokens_total, model, args.keep), runs),
                    strict=True,
                )
            )
    except subprocess.CalledProcessError as exc:
        print(
            f"a run (preparing or counting an app) failed, exit {exc.returncode}:", file=sys.stderr
        )
        print(exc.stderr.decode(errors="replace")[-3000:], file=sys.stderr)
        return 1
    per_call: dict[str, dict[str, float]] = {}
    for name in APPS:
        empty, full = counted[(name, 0)], counted[(name, args.calls)]
        per_call[name] = {k: (full[k] - empty[k]) / args.calls for k in full if k in COUNTERS}
    print(f"per hook call, in-process, {args.calls} calls after {WARM_UP} warm-up calls:")
    print(f"{'counter':8} {'peer':>12} {'ours':>12} {'ours/peer':>10}")
    for counter in COUNTERS:
        if counter not in per_call["peer"]:
            continue
        peer, ours = per_call["peer"][counter], per_call["ours"][counter]
        ratio = ours / peer if peer else float("nan")
        print(f"{counter:8} {peer:12,.0f} {ours:12,.0f} {ratio:10.3f}")
    print("JSON " + json.dumps({"calls": args.calls, "per_call": per_call}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
