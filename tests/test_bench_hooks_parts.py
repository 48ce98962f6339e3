"""The attribution of py-spy samples to a hook call's parts (benchmarks/bench_hooks_parts.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_hooks_parts import UNIT, parts_of

REQUEST = (
    'process 1:"gunicorn";SyncWorker.run (gunicorn/workers/sync.py:132);'
    "SyncWorker.handle_request (gunicorn/workers/sync.py:184);Flask.__call__ (flask/app.py:1536)"
)
VIEW = (
    f"{REQUEST};call (cds_service/hooks/__init__.py:80);"
    "handle (cds_service/hooks/patient_view.py:120)"
)


def test_a_sample_goes_to_its_innermost_marked_part() -> None:
    raw = "\n".join(
        [
            # the signature inside the token check inside the view: the signature
            f"{VIEW};TokenVerifier.verify (cds_service/auth.py:254);"
            "PyJWT.decode (jwt/api_jwt.py:370);ECAlgorithm.verify (jwt/algorithms.py:400) 7",
            # the commit inside the view: the database, also below it (a driver frame)
            f"{VIEW};DeferredCall.commit (cds_service/hooks/auth.py:140);"
            "HookStatements.record (cds_service/store/hook_path.py:280) 5",
            f"{VIEW};CardTemplate.render (cds_service/card_cache.py:50) 3",  # the view itself
            f"{REQUEST};Flask.finalize_request (flask/app.py:940) 2",
            f"{REQUEST};Flask.wsgi_app (flask/app.py:1500) 4",  # Flask, no inner mark
            "SyncWorker.handle_request (gunicorn/workers/sync.py:190);util.write (x.py:1) 1",
            'process 1:"gunicorn";Arbiter.run (gunicorn/arbiter.py:247) 9',  # not a request
            "not a profile line",
        ]
    )
    counts, outside = parts_of(raw)
    assert counts[UNIT] == 7
    assert counts["database: connection, jti (+ audit) commit"] == 5
    assert counts["the view (ours: patient, lookup, card)"] == 3
    assert counts["Flask request hooks (metrics, CORS, CSRF)"] == 2
    assert counts["Flask: routing, contexts, session"] == 4
    assert counts["gunicorn: HTTP parse, response write"] == 1
    assert sum(counts.values()) == 22
    assert outside == 9
