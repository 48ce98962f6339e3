"""Benchmark the patient-view hook against a bare Flask app and a minimal conformant peer.

The bare app returns a fixed card and does nothing else. The conformant peer does the least any
conformant CDS service must (CDS Hooks 2.0.1 "Trusting CDS Clients"): verify the ES384/RS384 JWT
(trusted ``iss``, exact ``aud``, ``exp``/``iat``, signature from the issuer's JWKS), record the
``jti`` in the same kind of database (SQLite by default, PostgreSQL with ``--db-url`` or
``--postgres``) to refuse replays, parse the JSON body, return a fixed card. The peer and ours
get the same tokens (each has its own jti table). All three run under gunicorn with the same worker class, count and threads (default 2 sync workers)
on loopback, loaded by ``wrk`` with the same 20 connections for the same bounded duration, in one
run. Our service does the full work of a real call: JWT verification (ES384 by default, each
request a fresh pre-generated token because jti replay is refused), jti + audit write, patient
matching, stored-prediction lookup, the card with its Observation. Every call is for the same
patient, so after its first call each process reuses that lookup (checked against the
database's hook generation inside the jti write); ``--no-reuse`` makes every call read it, as
the first call for each patient does. Prints p50/p99 latency,
throughput, errors, the throughput ratio and the load average; with ``--rounds N`` both apps are
measured N times and the goals (p99 <= 50 ms, throughput >= 0.9x the conformant peer and
>= 0.5x bare, zero errors) are judged on the medians, because the machine is shared.

    .venv/bin/python benchmarks/bench_hooks.py [--duration 10] [--rounds 3] \
        [--worker-class gthread --worker-threads 4] [--alg RS384] \
        [--postgres | --db-url postgresql://user@host/empty_db] [--no-reuse]
    .venv/bin/python benchmarks/bench_hooks.py --profile 1000   # in-process stages + cProfile

Needs ``wrk`` (Debian: apt-get install -y wrk). Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "tests"),
    str(Path(__file__).resolve().parent),
    str(Path(__file__).resolve().parents[1]),  # tests.system, used by tests/scaled_servers.py
]

from _local import ROOT, free_port, wait_port  # noqa: E402

ISSUER = "https://ehr.bench.test"
SERVICE_PATH = "/cds-services/her2low-mri"
FIXED_CARD = {
    "cards": [
        {
            "uuid": "9d4b1c7e-1f0a-4c55-9a59-3b1f1c2f6a10",
            "summary": "MRI HER2-low likelihood 71% (at/above 50% threshold), left breast",
            "indicator": "info",
            "source": {"label": "bare"},
        }
    ]
}

#: Each app as gunicorn loads it: (WSGI app spec, folder gunicorn runs it from).
GUNICORN_APPS: dict[str, tuple[str, Path]] = {
    "bare": ("bench_hooks:bare_app()", ROOT / "benchmarks"),
    "peer": ("bench_hooks:peer_app()", ROOT / "benchmarks"),
    "ours": ("cds_service.wsgi:app()", ROOT),
}

#: The order the apps run in, by round. Any three rounds in a row put each app first, second and
#: third once (six rounds use every order once), so no app always runs after the same one: with
#: the old alternation the peer always ran second.
ORDERS = (
    ("bare", "peer", "ours"),
    ("peer", "ours", "bare"),
    ("ours", "bare", "peer"),
    ("ours", "peer", "bare"),
    ("peer", "bare", "ours"),
    ("bare", "ours", "peer"),
)

LUA = r"""
local counter = 0
local tokens = {}
local thread_id = 0
local next_id = 0
local body = nil

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  local folder = args[1]
  local f = io.open(folder .. "/tokens-" .. id .. ".txt", "r")
  if f then
    for line in f:lines() do tokens[#tokens + 1] = line end
    f:close()
  end
  local b = io.open(folder .. "/body.json", "r")
  body = b:read("*a")
  b:close()
end

function request()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json"}
  if #tokens > 0 then
    headers["Authorization"] = "Bearer " .. (tokens[counter] or "exhausted")
  end
  return wrk.format("POST", wrk.path, headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    "JSON {\"requests\": %d, \"duration_us\": %d, \"errors\": %d, \"status_errors\": %d, " ..
    "\"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p95_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, " ..
    "\"connect_errors\": %d, \"timeouts\": %d}\n",
    summary.requests, summary.duration, errors, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, summary.errors.connect, summary.errors.timeout))
end
"""


def bare_app() -> Any:
    """gunicorn factory of the comparison app: a fixed card, no work."""
    from flask import Flask, jsonify

    app = Flask("bare")

    @app.post("/cds-services/her2low-mri")
    def call() -> Any:
        return jsonify(FIXED_CARD)

    return app


PEER_TABLE = "bench_peer_jti"


def peer_app() -> Any:
    """gunicorn factory of the conformant peer (configured by BENCH_PEER_* variables).

    One JWKS file, one trusted issuer, one audience; per request: signature + claims, a
    committed jti insert (a duplicate is a replay: 401), the JSON body, a fixed card.
    """
    import jwt
    import sqlalchemy as sa
    from flask import Flask, abort, jsonify, request

    from her2low.core.database import make_engine

    audience = os.environ["BENCH_PEER_AUD"]
    keys = {
        entry["kid"]: jwt.PyJWK(entry)
        for entry in json.loads(Path(os.environ["BENCH_PEER_JWKS"]).read_text())["keys"]
    }
    engine = make_engine(os.environ["BENCH_PEER_DB_URL"])
    table = sa.Table(
        PEER_TABLE,
        sa.MetaData(),
        sa.Column("iss", sa.String(255), primary_key=True),
        sa.Column("jti", sa.String(255), primary_key=True),
        sa.Column("exp", sa.Float, nullable=False),
    )
    insert = table.insert()
    app = Flask("peer")

    @app.post("/cds-services/her2low-mri")
    def call() -> Any:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            abort(401)
        token = header[7:]
        try:
            key = keys[jwt.get_unverified_header(token)["kid"]]
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["ES384", "RS384"],
                audience=audience,
                issuer=ISSUER,
                leeway=30,
                options={"require": ["exp", "iat", "jti", "iss", "aud"]},
            )
        except (jwt.PyJWTError, KeyError):
            abort(401)
        try:
            with engine.begin() as conn:
                conn.execute(insert, {"iss": ISSUER, "jti": claims["jti"], "exp": claims["exp"]})
        except sa.exc.IntegrityError:
            abort(401)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or body.get("hook") != "patient-view":
            abort(400)
        return jsonify(FIXED_CARD)

    return app


def configure_peer(env: dict[str, str], home: Path, port: int, db_url: str | None = None) -> None:
    """Point the peer (``BENCH_PEER_*`` in ``env``) at ours' audience, JWKS and a jti table in
    ``db_url`` (default: a SQLite file in ``home``), and create that table."""
    env.update(
        BENCH_PEER_AUD=f"http://127.0.0.1:{port}{SERVICE_PATH}",
        BENCH_PEER_JWKS=str(home / "jwks.json"),
        BENCH_PEER_DB_URL=db_url or f"sqlite:///{home / 'peer.db'}",
    )
    _peer_tables(env["BENCH_PEER_DB_URL"])


def prepared_apps(
    stack: contextlib.ExitStack, port: int, *, postgres: bool = False, db_url: str | None = None
) -> tuple[Path, dict[str, str], dict[str, Any], str | None]:
    """A temporary home with ours' database filled and the peer configured (``stack`` owns both).

    ``port`` is ours' port, the audience both apps check. ``postgres``: a throwaway PostgreSQL
    (closed with ``stack``) holds both apps' tables; else ``db_url``, else SQLite files in the
    home. Returns the home, the apps' environment, the hook body and the database URL.
    """
    home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hooks-")))
    if postgres:
        from tests.scaled_servers import postgres_server

        db_url = stack.enter_context(postgres_server()).create_database("bench_hooks")
    env, body = prepare_home(home, port, db_url)
    return home, env, body, db_url


def prepare_home(
    home: Path, port: int, db_url: str | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """Fill ours' database in ``home`` (or ``db_url``) and configure the peer beside it.

    Returns both apps' environment and the hook body. ``prepared_apps`` calls it on a folder it
    owns; ``bench_hooks_instructions`` on one it hands to another process.
    """
    env, body = _prepare(home, port, db_url)
    configure_peer(env, home, port, db_url)
    return env, body


def _peer_tables(url: str) -> None:
    """Create the peer's jti table once, before gunicorn forks (like a migration)."""
    import sqlalchemy as sa

    from her2low.core.database import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {PEER_TABLE} (iss VARCHAR(255) NOT NULL, "
                "jti VARCHAR(255) NOT NULL, exp FLOAT NOT NULL, PRIMARY KEY (iss, jti))"
            )
        )
    engine.dispose()


def _empty_jti_tables(ours_url: str, peer_url: str) -> None:
    """Start a round with both apps' jti tables empty (each round mints fresh tokens).

    Emptying only the peer's let ours' table grow round after round: a bigger unique index
    to insert into at random than the peer's, which is not the same work.
    """
    import sqlalchemy as sa

    from her2low.core.database import make_engine

    for url, table in ((ours_url, "jti_replay"), (peer_url, PEER_TABLE)):
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {table}"))
        engine.dispose()


def _gunicorn(
    app: str,
    port: int,
    workers: int,
    env: dict[str, str],
    chdir: Path,
    worker_class: str,
    threads: int,
) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "gunicorn"
    cmd = [
        str(exe),
        "-w",
        str(workers),
        "-k",
        worker_class,
        "--threads",
        str(threads),
        "-b",
        f"127.0.0.1:{port}",
        "--chdir",
        str(chdir),
        "--log-level",
        "warning",
        app,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wrk(url: str, folder: Path, duration: int, connections: int, threads: int) -> dict[str, Any]:
    script = folder / "bench.lua"
    script.write_text(LUA)
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
        "--",
        str(folder),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 60, check=True
    ).stdout
    match = re.search(r"^JSON (.*)$", out, re.M)
    if not match:
        raise RuntimeError(out)
    data: dict[str, Any] = json.loads(match.group(1))
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


def _workers_cpu(master: int) -> float:
    """CPU seconds (user + system) used so far by the gunicorn master's worker processes."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we read
        if int(fields[1]) == master:  # fields[1] is the ppid (field 4 of proc(5))
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def _wait_booted(port: int, timeout: float = 180.0) -> float:
    """Wait until a gunicorn worker answers HTTP (any status); returns the seconds it took.

    The master binds the port before its workers have imported the app, which on this loaded
    machine takes 5-20 s (ours imports more than the peers); a measurement started on the bound
    port alone timed out every request. The workers boot side by side, so once one answers,
    waiting half as long again lets the other finish too (the same rule for all three apps).
    """
    import http.client

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.request("GET", SERVICE_PATH)
            conn.getresponse().read()
            conn.close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        raise RuntimeError(f"no worker on port {port} answered within {timeout} s")
    took = time.monotonic() - started
    time.sleep(min(took / 2, 30.0))
    return took


def _python_load(
    port: int, body: bytes, tokens: list[str], duration: float, connections: int
) -> dict[str, Any]:
    """A bounded threaded client (http.client, one request per connection like wrk here).

    Cross-checks wrk's latency figures with independent per-request timing.
    """
    import http.client
    import threading
    from collections import deque

    queue = deque(tokens)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker() -> None:
        local: list[float] = []
        failures = 0
        while time.monotonic() < stop_at:
            headers = {"Content-Type": "application/json"}
            if tokens:
                try:
                    headers["Authorization"] = "Bearer " + queue.popleft()
                except IndexError:
                    break
            started = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", SERVICE_PATH, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                conn.close()
                if response.status != 200:
                    failures += 1
            except OSError:
                failures += 1
            local.append(time.perf_counter() - started)
        with lock:
            latencies.extend(local)
            errors[0] += failures

    began = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 30)
    elapsed = time.monotonic() - began
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0
        )

    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "rps": len(latencies) / elapsed,
        "errors": errors[0],
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
    }


def _prepare(
    home: Path, port: int, db_url: str | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """Migrate, publish a result and descriptors in-process, return env and the hook body."""
    from test_cds_support import (
        FULL_FEATURES,
        MASS_DESCRIPTORS,
        FakePredictor,
        jwks,
        patient_resource,
        result_payload,
    )

    from cds_service.app import create_app
    from cds_service.db import MIGRATIONS
    from her2low.core.settings import Settings

    (home / "jwks.json").write_text(json.dumps(jwks("es", "rs")))
    env = dict(os.environ)
    env.update(
        HER2LOW_HOME=str(home),
        HER2LOW_CDS_DB_URL=db_url or f"sqlite:///{home / 'cds.db'}",
        HER2LOW_CDS_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        HER2LOW_CDS_TRUSTED_ISSUERS=json.dumps({ISSUER: str(home / "jwks.json")}),
        HER2LOW_RESULTS_API_TOKEN="bench-results-token",
        HER2LOW_CDS_PATIENT_ID_SYSTEMS=json.dumps({"HOSP": "urn:oid:1.2.3.4.5"}),
        HER2LOW_LOG_LEVEL="WARNING",
    )
    settings = Settings(
        home=home,
        cds_db_url=env["HER2LOW_CDS_DB_URL"],
        cds_public_base_url=env["HER2LOW_CDS_PUBLIC_BASE_URL"],
        results_api_token="bench-results-token",
        cds_patient_id_systems={"HOSP": "urn:oid:1.2.3.4.5"},
    )
    MIGRATIONS.upgrade(settings.cds_database_url)
    runtime: Any
    try:
        from models.runtime import ModelRuntime

        runtime = ModelRuntime.load(None)
    except ImportError:
        runtime = FakePredictor()
    app = create_app(settings, runtime=runtime)
    client = app.test_client()
    auth = {"Authorization": "Bearer bench-results-token"}
    for i in range(200):  # other patients, so the lookup is not trivially small
        other = result_payload(patient_id=f"MRN-{i + 100}")
        other["features"] = FULL_FEATURES
        client.post("/api/v1/results", json=other, headers=auth)
    mine = result_payload()
    mine["features"] = FULL_FEATURES
    rid = client.post("/api/v1/results", json=mine, headers=auth).get_json()["result_id"]
    values = {"values": MASS_DESCRIPTORS, "roi_confirmed": True, "entered_by": "bench"}
    put = client.put(f"/api/v1/cases/{rid}/descriptors", json=values, headers=auth).get_json()
    if put["prediction"]["error"]:
        raise RuntimeError(f"prediction failed: {put['prediction']['error']}")
    print(
        f"model: {put['prediction']['model_version']} ({put['prediction']['variant']}, "
        f"{type(runtime).__name__})",
        flush=True,
    )
    app.extensions["her2low_cds"].engine.dispose()
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/doc-1", "patientId": "pat-1"},
        "prefetch": {"patient": patient_resource(), "her2": None},
    }
    return env, body


def imaging_prefetch(study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> dict[str, Any]:
    """The `imaging` prefetch naming the benchmark patient's MRI study (as `result_payload`)."""
    study = {
        "resourceType": "ImagingStudy",
        "id": "img-1",
        "status": "available",
        "subject": {"reference": "Patient/pat-1"},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
    }
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": study}]}


def later_her2_prefetch(day: str = "2026-12-01") -> dict[str, Any]:
    """A `her2` prefetch with a HER2 result dated after the MRI (`result_payload`: 2026-11-25)."""
    from test_cds_support import her2_bundle

    bundle = her2_bundle(text="IHC 1+")
    assert bundle is not None
    bundle["entry"][0]["resource"]["effectiveDateTime"] = day
    return bundle


def _tokens(folder: Path, aud: str, threads: int, per_thread: int, kind: str = "es") -> None:
    from test_cds_support import make_token

    for t in range(threads):
        tokens = [make_token(aud, kind=kind, iss=ISSUER, lifetime=280) for _ in range(per_thread)]
        (folder / f"tokens-{t}.txt").write_text("\n".join(tokens) + "\n")


def _row(name: str, r: dict[str, Any], note: str = "") -> str:
    return (
        f"{name:8} {r['requests']:>9} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
        f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['errors']:>7}"
        + (f" {r['cpu_ms']:>8.3f}" if "cpu_ms" in r else "")
        + note
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _not_cached() -> Any:
    raise RuntimeError("the warm-up calls should have prepared the card")


def _profile(requests_n: int) -> int:
    """Single-process profile of the hook path: stage timings, then cProfile of whole requests.

    Stages are timed by calling each component as the view does (perf_counter, median over
    ``requests_n`` calls); the full request goes through Flask's test client (no HTTP server).
    """
    import cProfile
    import pstats

    from test_cds_support import make_token

    from cds_service.app import create_app
    from cds_service.card_cache import Slot
    from cds_service.identity import patient_keys
    from cds_service.schema import parse_hook_request, parse_json
    from cds_service.store import UsedToken
    from her2low.core.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp:
        port = 8080
        env, body = _prepare(Path(tmp), port)
        os.environ.update(env)
        app = create_app(load_settings())
        st = app.extensions["her2low_cds"]
        client = app.test_client()
        aud = f"http://127.0.0.1:{port}{SERVICE_PATH}"
        raw = json.dumps(body).encode()
        # The same call as EHRs send it: honouring the discovery's `imaging` prefetch, and for a
        # patient whose later pathology (dated after the MRI) is in the `her2` prefetch.
        variants = {
            "  with imaging prefetch": {"imaging": imaging_prefetch()},
            "  with a later HER2 result": {"her2": later_her2_prefetch()},
        }
        raws = {
            name: json.dumps({**body, "prefetch": {**body["prefetch"], **extra}}).encode()
            for name, extra in variants.items()
        }
        n_tokens = (3 + len(raws)) * requests_n + 50
        tokens = [make_token(aud, iss=ISSUER, lifetime=280) for _ in range(n_tokens)]
        headers = {"Content-Type": "application/json"}

        def call(token: str, data: bytes = raw) -> None:
            response = client.post(
                SERVICE_PATH, data=data, headers={**headers, "Authorization": "Bearer " + token}
            )
            assert response.status_code == 200, response.data
            if data is raws["  with imaging prefetch"]:
                assert b'"reference":"ImagingStudy/img-1"' in response.data

        for token in tokens[:50]:  # warm-up: caches, compiled statements
            call(token)
        stage: dict[str, list[float]] = {}

        def timed(name: str, fn: Any) -> Any:
            t0 = time.perf_counter()
            value = fn()
            stage.setdefault(name, []).append(time.perf_counter() - t0)
            return value

        leeway = st.settings.cds_jwt_leeway_seconds
        for token in tokens[50 : 50 + requests_n]:
            verified = timed("JWT verify (ES384)", lambda t=token: st.verifier.verify(t, aud))
            hook = timed("body JSON + pydantic", lambda: parse_hook_request(parse_json(raw)))
            keys = patient_keys(hook.prefetch["patient"], st.settings.cds_patient_id_systems).keys
            rows = timed("lookup (uncached)", lambda k=keys: st.store.hook_rows(k)).rows
            row = rows[0]
            key = (row.prediction_id, row.result_id, row.acquired_at, row.laterality)
            prepared = st.cards.get_or_build(key, _not_cached)
            timed(
                "card render (cached)",
                lambda pc=prepared: pc.plain.render(  # type: ignore[union-attr]
                    {Slot.PATIENT_ID: "pat-1", Slot.BIOPSY_LINE: "- **Biopsy HER2:** none"}
                ),
            )
            used = UsedToken.of(verified.iss, verified.jti, verified.exp, leeway)
            event = [("Practitioner/doc-1", "card-shown", row.result_id, {"card": "x"})]
            timed("jti + audit (1 commit)", lambda u=used, e=event: st.store.record_call(u, e))
        spare = iter(tokens[50 + 3 * requests_n :])
        for token in tokens[50 + requests_n : 50 + 2 * requests_n]:  # the bodies interleaved
            timed("whole request (test client)", lambda t=token: call(t))
            for name, data in raws.items():
                timed(name, lambda t=next(spare), d=data: call(t, d))
        print(f"stage timings, median of {requests_n} calls (load {_load()}):")
        for name, values in stage.items():
            print(f"  {name:30} {_median(values) * 1e3:7.3f} ms")
        profiler = cProfile.Profile()
        profiler.enable()
        for token in tokens[50 + 2 * requests_n : 50 + 3 * requests_n]:
            call(token)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        if os.environ.get("BENCH_CALLERS"):
            pstats.Stats(profiler).print_callers(os.environ["BENCH_CALLERS"])
        st.engine.dispose()
    return 0


def _round(
    args: argparse.Namespace,
    home: Path,
    env: dict[str, str],
    raw_body: bytes,
    dirs: dict[str, Path],
    ports: dict[str, int],
    order: tuple[str, ...],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """One measurement of both apps (fresh tokens, empty jti tables, fresh gunicorn processes)."""
    from test_cds_support import make_token

    _empty_jti_tables(env["HER2LOW_CDS_DB_URL"], env["BENCH_PEER_DB_URL"])
    results: dict[str, dict[str, Any]] = {}
    sequential: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    aud = f"http://127.0.0.1:{ports['ours']}{SERVICE_PATH}"
    kind = "es" if args.alg == "ES384" else "rs"
    _tokens(dirs["ours"], aud, args.threads, args.tokens_per_thread, kind)
    for t in range(args.threads):  # the peer checks the same audience; its own jti table
        name = f"tokens-{t}.txt"
        (dirs["peer"] / name).write_text((dirs["ours"] / name).read_text())
    extra = [
        make_token(aud, kind=kind, iss=ISSUER, lifetime=280)
        for _ in range(args.sequential * 1200 + 100)
    ]
    print(
        f"generated {args.threads * args.tokens_per_thread + len(extra)} {args.alg} tokens in "
        f"{time.monotonic() - started:.1f} s; load {_load()}",
        flush=True,
    )
    for name in order:
        app, chdir = GUNICORN_APPS[name]
        port = ports[name]
        proc = _gunicorn(
            app, port, args.workers, env, chdir, args.worker_class, args.worker_threads
        )
        url = f"http://127.0.0.1:{port}{SERVICE_PATH}"
        tokens = extra if name != "bare" else []
        try:
            wait_port(port)
            booted = _wait_booted(port)
            print(f"  {name}: a worker answered {booted:.1f} s after start", flush=True)
            # warm-up: each worker's first request pays lazy imports, connections, card cache
            _python_load(port, raw_body, tokens[:40], 1.0, 2)
            tokens = tokens[40:]
            if args.sequential:
                sequential[name] = _python_load(port, raw_body, tokens, args.sequential, 1)
            cpu_before = _workers_cpu(proc.pid)
            if args.client == "wrk":
                results[name] = _wrk(url, dirs[name], args.duration, args.connections, args.threads)
            else:
                pool: list[str] = []
                if name != "bare":
                    for t in range(args.threads):
                        pool += (dirs[name] / f"tokens-{t}.txt").read_text().split()
                results[name] = _python_load(port, raw_body, pool, args.duration, args.connections)
            cpu = _workers_cpu(proc.pid) - cpu_before
            results[name]["cpu_ms"] = 1000 * cpu / max(results[name]["requests"], 1)
        finally:
            _stop(proc)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            if "Traceback" in stderr:
                print(stderr[-3000:], file=sys.stderr)
    return results, sequential


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--tokens-per-thread", type=int, default=12000)
    parser.add_argument(
        "--alg",
        choices=("ES384", "RS384"),
        default="ES384",
        help="signature of the EHR's tokens (both are accepted; ES384 is the one CDS Hooks "
        "requires clients to support)",
    )
    parser.add_argument("--worker-class", default="sync", help="gunicorn worker class (both apps)")
    parser.add_argument("--worker-threads", type=int, default=1, help="gthread threads per worker")
    parser.add_argument(
        "--sequential", type=int, default=5, help="seconds of a 1-connection run (service time)"
    )
    parser.add_argument(
        "--client", choices=("wrk", "python"), default="wrk", help="load generator of the main run"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the apps this many times (in the orders of ORDERS); goals are judged "
        "on the medians",
    )
    parser.add_argument(
        "--db-url",
        help="PostgreSQL URL of an empty database for ours and the peer (default: SQLite files)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="start a throwaway PostgreSQL (initdb on a free port) and use it for both",
    )
    parser.add_argument(
        "--no-reuse",
        action="store_true",
        help="ours without reusing a patient's lookup (HER2LOW_CDS_HOOK_LOOKUP_CACHE_SIZE=0): "
        "every call reads the database, as the first call for each patient does",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="instead of the load test: profile N in-process calls (stages, cProfile)",
    )
    args = parser.parse_args()
    if args.profile:
        return _profile(args.profile)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    rounds: list[tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], str]] = []
    with contextlib.ExitStack() as stack:
        ports = {"ours": free_port(), "bare": free_port(), "peer": free_port()}
        home, env, body, db_url = prepared_apps(
            stack, ports["ours"], postgres=args.postgres, db_url=args.db_url
        )
        if args.no_reuse:
            env["HER2LOW_CDS_HOOK_LOOKUP_CACHE_SIZE"] = "0"
        dirs = {n: home / n for n in ("ours", "bare", "peer")}
        for folder in dirs.values():
            folder.mkdir()
            (folder / "body.json").write_text(json.dumps(body))
        raw_body = json.dumps(body).encode()
        for index in range(args.rounds):
            order = ORDERS[index % len(ORDERS)]
            before = _load()
            results, sequential = _round(args, home, env, raw_body, dirs, ports, order)
            rounds.append((results, sequential, f"{before} -> {_load()}"))
    print(
        f"\nload: {args.client} ({args.threads} threads), {args.connections} connections, "
        f"{args.duration} s; {args.alg} tokens; "
        f"{'PostgreSQL' if db_url else 'SQLite'} jti tables; "
        f"ours {'without' if args.no_reuse else 'with'} lookup reuse; "
        f"gunicorn {args.workers} {args.worker_class} workers x {args.worker_threads} threads "
        "each; loopback"
    )
    header = ("app", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors")
    header += ("CPU ms/req",)  # the server workers' user + system CPU per request (main run)
    ratios: list[float] = []
    peer_ratios: list[float] = []
    for index, (results, sequential, load) in enumerate(rounds, 1):
        print(f"\nround {index} (load average 1/5/15 min: {load})")
        print(
            f"{header[0]:8} "
            + " ".join(f"{h:>{9 if i < 2 else 8}}" for i, h in enumerate(header[1:]))
        )
        for name, r in results.items():
            print(_row(name, r))
        for name, r in sequential.items():
            print(_row(f"{name}/1c", r, "   (1 connection, Python client: service time)"))
        ratios.append(results["ours"]["rps"] / results["bare"]["rps"])
        print(f"throughput ratio ours/bare ({args.connections} connections): {ratios[-1]:.2f}")
        peer_ratios.append(results["ours"]["rps"] / results["peer"]["rps"])
        print(
            f"throughput ratio ours/conformant peer ({args.connections} connections): "
            f"{peer_ratios[-1]:.2f}"
        )
        if sequential.get("peer") and sequential.get("ours"):
            print(
                "service time ours/peer (1 connection, p50): "
                f"{sequential['ours']['p50_ms']:.2f} / {sequential['peer']['p50_ms']:.2f} ms"
            )
    med: dict[str, dict[str, float]] = {}
    for name in ("bare", "peer", "ours"):
        med[name] = {
            k: _median([r[0][name][k] for r in rounds])
            for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "cpu_ms")
        }
        if args.sequential:
            med[name + "/1c"] = {
                k: _median([r[1][name][k] for r in rounds]) for k in ("rps", "p50_ms", "p99_ms")
            }
    ratio = _median(ratios)
    peer_ratio = _median(peer_ratios)
    print(f"\nmedians over {len(rounds)} round(s):")
    for name, m in med.items():
        print(f"  {name:8} " + " ".join(f"{k} {v:.2f}" for k, v in m.items()))
    print(f"  ratio ours/bare {ratio:.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(
        f"  ratio ours/peer {peer_ratio:.2f} "
        f"(per round: {', '.join(f'{x:.2f}' for x in peer_ratios)})"
    )
    errors = sum(
        r["errors"]
        for results, sequential, _ in rounds
        for r in (*results.values(), *sequential.values())
    )
    goals = {
        "p99 <= 50 ms": med["ours"]["p99_ms"] <= 50,
        "throughput >= 0.9x conformant peer": peer_ratio >= 0.9,
        "throughput >= 0.5x bare": ratio >= 0.5,
        "zero errors": errors == 0,
        "tokens not exhausted": all(
            r[0][n]["requests"] <= args.threads * args.tokens_per_thread
            for r in rounds
            for n in ("ours", "peer")
        ),
    }
    for goal, met in goals.items():
        print(f"  {'met   ' if met else 'MISSED'} {goal}")
    summary = {
        "rounds": [{"results": r, "sequential": s, "load": load} for r, s, load in rounds],
        "medians": med,
        "ratio": ratio,
        "ratio_peer": peer_ratio,
        "goals": goals,
    }
    print("JSON " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
