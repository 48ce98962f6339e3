"""Where a hook call's time goes under load, ours against the minimal conformant peer (py-spy).

``bench_hooks_instructions.py`` counts the work of a call in one quiet process. Under load the
same work costs more: two gunicorn workers and ``wrk`` share two cores and each other's caches,
and every SQLite commit of one worker makes the other re-read its pages. This script runs each
app as ``bench_hooks.py`` does (gunicorn, same workers, ``wrk`` with 20 connections, the same
warm-up), samples the workers with py-spy while ``wrk`` runs, and puts every sample taken inside
a request into one part of the call, chosen by the innermost frame that marks a part (``PARTS``).

The parts are given in **units of the ES384 signature check** (PyJWT's ``ECAlgorithm.verify``,
which is OpenSSL's): both apps do exactly that work once per call, so a unit is the same work
in both, whatever the machine's load. The per-app sum, ours over the peer's, estimates how much
more one request of ours costs under this load; the throughput ratio of ``bench_hooks.py`` is
roughly its inverse. py-spy leaves out a thread that is waiting in the kernel (a lock, a sleep),
so these are shares of the time the workers run, not of wall time.

    .venv/bin/python benchmarks/bench_hooks_parts.py [--rounds 2] [--duration 10] [--rate 250]

Needs ``wrk`` (Debian: apt-get install -y wrk) and py-spy (pip install py-spy; it traces other
processes, so run it as root or with ptrace allowed). About 1.5 minutes a round. ``--postgres``
starts a throwaway PostgreSQL (as ``bench_hooks.py --postgres`` does) for both apps' tables.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import bench_hooks  # noqa: E402  (its sys.path set-up makes tests/ and the project importable)
from _local import free_port, wait_port  # noqa: E402

#: (part, frames marking it), innermost first: a sample goes to the first part, walking from
#: its innermost frame outwards, that one of its frames marks. A frame is ``Qualified.name
#: (path/file.py)``, as py-spy names it without the line number.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ES384 signature (the unit)", ("ECAlgorithm.verify (jwt/algorithms.py)",)),
    (
        "token: decode, key, claims",
        (
            "TokenVerifier.verify (cds_service/auth.py)",
            "PyJWT.decode (jwt/api_jwt.py)",
            "PyJWS.get_unverified_header (jwt/api_jws.py)",
        ),
    ),
    (
        "database: connection, jti (+ audit) commit",
        (
            "DeferredCall.commit (cds_service/hooks/auth.py)",
            "DeferredCall.connection (cds_service/hooks/auth.py)",
            "DeferredCall.close (cds_service/hooks/auth.py)",
            "Engine.begin (sqlalchemy/engine/base.py)",
            "Connection.execute (sqlalchemy/engine/base.py)",
        ),
    ),
    (
        "request body: read, JSON",
        (
            "read_json (cds_service/request_json.py)",
            "Request.get_json (werkzeug/wrappers/request.py)",
        ),
    ),
    ("hook request model (pydantic)", ("parse_hook_request (cds_service/schema.py)",)),
    (
        "response body",
        ("jsonify (flask/json/__init__.py)", "Response.__init__ (werkzeug/wrappers/response.py)"),
    ),
    (
        "the view (ours: patient, lookup, card)",
        (
            "handle (cds_service/hooks/patient_view.py)",
            "call (cds_service/hooks/__init__.py)",
            "jwt_required_deferred.<locals>.wrapper (cds_service/hooks/auth.py)",
            "peer_app.<locals>.call (bench_hooks.py)",
        ),
    ),
    (
        "Flask request hooks (metrics, CORS, CSRF)",
        ("Flask.preprocess_request (flask/app.py)", "Flask.finalize_request (flask/app.py)"),
    ),
    ("Flask: routing, contexts, session", ("Flask.__call__ (flask/app.py)",)),
    (
        "gunicorn: HTTP parse, response write",
        ("SyncWorker.handle_request (gunicorn/workers/sync.py)",),
    ),
)
UNIT = PARTS[0][0]
REQUEST_FRAME = PARTS[-1][1][0]  # gunicorn's request handler: a sample outside it is no request
_LINE = re.compile(r":\d+\)$")
_MARKS = {frame: part for part, frames in PARTS for frame in frames}


def parts_of(raw: str) -> tuple[collections.Counter[str], int]:
    """Samples per part of a py-spy ``raw`` profile, and the samples taken outside requests."""
    counts: collections.Counter[str] = collections.Counter()
    outside = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        if REQUEST_FRAME not in frames:
            outside += int(n)
            continue
        part = next(_MARKS[f] for f in reversed(frames) if f in _MARKS)
        counts[part] += int(n)
    return counts, outside


def _sample(
    name: str, home: Path, env: dict[str, str], raw_body: bytes, args: argparse.Namespace
) -> tuple[str, float]:
    """One app under wrk with py-spy on its workers: the raw profile and the requests/s."""
    from test_cds_support import make_token

    app, chdir = bench_hooks.GUNICORN_APPS[name]
    port = free_port()
    folder = home / name
    folder.mkdir(exist_ok=True)
    (folder / "body.json").write_bytes(raw_body)
    aud = env["BENCH_PEER_AUD"]
    bench_hooks._tokens(folder, aud, 2, args.tokens_per_thread)
    warm = [make_token(aud, iss=bench_hooks.ISSUER, lifetime=280) for _ in range(40)]
    bench_hooks._empty_jti_tables(env["HER2LOW_CDS_DB_URL"], env["BENCH_PEER_DB_URL"])
    proc = bench_hooks._gunicorn(app, port, args.workers, env, chdir, "sync", 1)
    out = folder / "pyspy.txt"
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_port(port)
        bench_hooks._wait_booted(port)
        bench_hooks._python_load(port, raw_body, warm, 1.0, 2)
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(proc.pid),
                "--subprocesses",
                "--nonblocking",
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}{bench_hooks.SERVICE_PATH}"
        result = bench_hooks._wrk(url, folder, args.duration, args.connections, 2)
        spy.wait(timeout=args.duration + 60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        bench_hooks._stop(proc)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError("py-spy could not sample the workers (run as root or allow ptrace)")
    if result["errors"]:
        raise RuntimeError(f"{name}: {result['errors']} failed requests")
    return out.read_text(), float(result["rps"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="peer then ours, this many times")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per app")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--tokens-per-thread", type=int, default=9000)
    parser.add_argument(
        "--postgres", action="store_true", help="both apps on a throwaway PostgreSQL"
    )
    args = parser.parse_args()
    for tool in ("wrk", str(Path(sys.executable).parent / "py-spy")):
        if shutil.which(tool) is None:
            print(f"{Path(tool).name} not found (see this script's docstring)", file=sys.stderr)
            return 2
    counts = {n: collections.Counter[str]() for n in ("peer", "ours")}
    rates: dict[str, list[float]] = {"peer": [], "ours": []}
    with contextlib.ExitStack() as stack:
        port = free_port()  # the audience both apps check; each app gets its own port
        home, env, body, _ = bench_hooks.prepared_apps(stack, port, postgres=args.postgres)
        raw_body = json.dumps(body).encode()
        for index in range(args.rounds):
            for name in ("peer", "ours") if index % 2 == 0 else ("ours", "peer"):
                try:
                    raw, rps = _sample(name, home, env, raw_body, args)
                except RuntimeError as exc:
                    print(exc, file=sys.stderr)
                    return 1
                found, outside = parts_of(raw)
                counts[name].update(found)
                rates[name].append(rps)
                print(
                    f"round {index + 1} {name}: {rps:.0f} req/s, {sum(found.values())} samples "
                    f"in requests, {outside} outside",
                    flush=True,
                )
    units = {n: {p: c[p] / c[UNIT] for p, _ in PARTS} for n, c in counts.items() if c[UNIT]}
    if len(units) != 2:
        print("no signature samples: is py-spy allowed to trace?", file=sys.stderr)
        return 1
    database = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"\nunits of the ES384 signature check per request ({args.rounds} rounds pooled, "
        f"{database})"
    )
    print(f"{'part':44} {'peer':>6} {'ours':>6} {'ours - peer':>12}")
    for part, _ in PARTS:
        peer, ours = units["peer"][part], units["ours"][part]
        print(f"{part:44} {peer:6.2f} {ours:6.2f} {ours - peer:+12.2f}")
    total = {n: sum(u.values()) for n, u in units.items()}
    print(
        f"{'a whole request':44} {total['peer']:6.2f} {total['ours']:6.2f} "
        f"{total['ours'] - total['peer']:+12.2f}"
    )
    print(
        f"\nours / peer per request: {total['ours'] / total['peer']:.2f} "
        f"(so about {total['peer'] / total['ours']:.2f}x the peer's throughput); measured here "
        f"under py-spy: {sum(rates['ours']) / sum(rates['peer']):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
