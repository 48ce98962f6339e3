"""What the benchmarks share: the checkout, its interpreter, and the loopback port helpers."""

from __future__ import annotations

import sys
from pathlib import Path

from her2low.core.ports import free_port
from her2low.core.ports import wait_port as _wait_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

__all__ = ["PY", "ROOT", "free_port", "wait_port"]


def wait_port(port: int, timeout: float = 60) -> None:
    """Wait until something accepts connections on the loopback ``port``, or raise."""
    if not _wait_port(port, timeout):
        raise RuntimeError(f"nothing listens on {port}")
