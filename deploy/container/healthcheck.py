#!/usr/bin/python3
"""Container health check: asks the component that runs as PID 1 whether it answers.

``service`` and ``up``: HTTP GET /healthz on the CDS port. ``node``: a DICOM C-ECHO with
DCMTK's echoscu (what a PACS would do). ``worker``: it has no port, so alive = healthy (the
orchestrator restarts it when it exits). Exit status 0 = healthy, 1 = unhealthy.
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


def http_ok() -> bool:
    port = os.environ.get("HER2LOW_CDS_PORT", "8080")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


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
        healthy = http_ok() and (name != "up" or echo_ok())
    elif name == "node":
        healthy = echo_ok()
    else:
        healthy = True  # a worker (or another command): alive while PID 1 runs
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
