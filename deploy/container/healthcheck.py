#!/usr/bin/python3
"""Container health check: asks the component that runs as PID 1 whether it answers.

``service`` and ``up``: HTTP GET /healthz on the CDS port. ``node``: a DICOM C-ECHO with
DCMTK's echoscu (what a PACS would do). ``worker``: GET /readyz on its side port
(HER2LOW_WORKER_METRICS_PORT): its database and queue answer and its runner's heartbeat is
recent, so a worker alive with a stalled runner is unhealthy; with the side port off (0) a
worker is healthy while it runs. Exit status 0 = healthy, 1 = unhealthy.
Standard library only: it runs with the system Python, outside the application's venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request


def component() -> str:
    """The her2low subcommand of PID 1 (``her2low service`` -> ``service``)."""
    try:
        with open("/proc/1/cmdline", "rb") as fh:
            args = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return ""
    for name in ("up", "service", "node", "worker"):
        if name in args[1:]:
            return name
    return ""


def http_ok(port: str, path: str = "/healthz") -> bool:
    """GET ``path`` on loopback answers 200 (urllib raises on 503 and on no answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=4) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def worker_ready() -> bool:
    """The worker's side port says ready (database, queue, store, runner heartbeat)."""
    port = os.environ.get("HER2LOW_WORKER_METRICS_PORT", "11181")
    return port == "0" or http_ok(port, "/readyz")


def echo_ok() -> bool:
    port = os.environ.get("HER2LOW_NODE_PORT", "11112")
    called = os.environ.get("HER2LOW_NODE_AE_TITLE", "HER2LOW")
    calling = os.environ.get("HER2LOW_HEALTHCHECK_AET", "HER2LOW-HEALTH")
    try:
        done = subprocess.run(
            ["/usr/bin/echoscu", "-to", "4", "-aet", calling, "-aec", called, "127.0.0.1", port],
            capture_output=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def main() -> int:
    name = component()
    if name in ("up", "service"):
        healthy = http_ok(os.environ.get("HER2LOW_CDS_PORT", "8080")) and (
            name != "up" or echo_ok()
        )
    elif name == "node":
        healthy = echo_ok()
    elif name == "worker":
        healthy = worker_ready()
    else:
        healthy = True  # another command (db upgrade, ...): alive while PID 1 runs
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
