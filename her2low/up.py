"""``her2low up``: the whole system on embedded defaults, in one terminal.

Migrates both databases, starts node, worker and service as child processes (logs under
``$HER2LOW_HOME/logs``), waits until each answers, loads the synthetic demo study through a real
DICOM association, prints where everything is, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from her2low import demo_ehr
from her2low.core.settings import Settings

COMPONENTS = ("node", "worker", "service")


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _child_env(settings: Settings, demo: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["HER2LOW_HOME"] = str(settings.home.resolve())
    if demo and not settings.cds_trusted_issuers:
        jwks = demo_ehr.ensure_keys(settings.home)
        env["HER2LOW_CDS_TRUSTED_ISSUERS"] = json.dumps({demo_ehr.ISSUER: str(jwks.resolve())})
    return env


def upgrade_databases(settings: Settings) -> None:
    """Migrate the node and the service databases to their heads (``her2low db upgrade``)."""
    from cds_service.db import MIGRATIONS as SERVICE_MIGRATIONS
    from dicom_node.db import MIGRATIONS as NODE_MIGRATIONS

    settings.home.mkdir(parents=True, exist_ok=True)
    NODE_MIGRATIONS.upgrade(settings.node_database_url)
    SERVICE_MIGRATIONS.upgrade(settings.cds_database_url)


def up(settings: Settings, *, demo: bool = True) -> int:
    home = settings.home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    upgrade_databases(settings)
    settings.results_token()  # create the shared secret before the children read it
    env = _child_env(settings, demo)
    children: dict[str, subprocess.Popen[bytes]] = {}
    for name in COMPONENTS:
        log_file = open(home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        children[name] = subprocess.Popen(
            [sys.executable, "-m", "her2low", name], env=env, stdout=log_file, stderr=log_file
        )
    host = "127.0.0.1"
    try:
        ok = _wait_port(host, settings.cds_port, 60) and _wait_port(host, settings.node_port, 60)
        if not ok or any(c.poll() is not None for c in children.values()):
            print(f"her2low up: a component did not start; see {home / 'logs'}", file=sys.stderr)
            return 1
        base = settings.cds_public_base_url.rstrip("/")
        print("her2low is up (reference model, NOT clinically validated)")
        print(
            f"  DICOM node     {settings.node_ae_title}@{socket.gethostname()}:{settings.node_port}"
        )
        print(f"  CDS discovery  {base}/cds-services")
        print(f"  review app     {base}/review/")
        print(f"  data           {home}")
        print(f"  logs           {home / 'logs'}")
        print("  settings       her2low config --show")
        if demo:
            if not settings.cds_trusted_issuers:
                print(
                    f"  trusting the local demo EHR issuer {demo_ehr.ISSUER} (keys in {home / 'secrets'})"
                )
            print("loading the synthetic demo study ...", flush=True)
            from her2low.demo import demo as run_demo

            if run_demo(settings, as_json=False, timeout=120) != 0:
                print(
                    "her2low up: the demo study did not produce a card; see the logs",
                    file=sys.stderr,
                )
        print("press Ctrl-C to stop", flush=True)
        while all(c.poll() is None for c in children.values()):
            time.sleep(1)
        dead = [n for n, c in children.items() if c.poll() is not None]
        print(f"her2low up: {', '.join(dead)} stopped; see {home / 'logs'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def log_paths(home: Path) -> dict[str, Path]:
    return {name: home / "logs" / f"{name}.log" for name in COMPONENTS}
