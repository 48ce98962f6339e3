"""Readiness checks and the ``/readyz`` body, one copy for the service and the node's side port."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

#: A readiness check: returns when the dependency is usable, raises when it is not.
Check = Callable[[], None]


def readiness(checks: Mapping[str, Check]) -> tuple[bool, dict[str, Any]]:
    """Run each check; (ready, ``{"status", "checks": {name: "ok" | "failed: …"}, "failing"}``).

    A failure names the exception type and its message (cut to 300 characters): readiness
    dependencies are databases, queues, folders and models, never patient data.
    """
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
    failing = [name for name, value in results.items() if value != "ok"]
    body: dict[str, Any] = {"status": "not ready" if failing else "ready", "checks": results}
    if failing:
        body["failing"] = failing
    return not failing, body


class Pulse:
    """When a loop last showed it is working (the worker's runner: a queue poll or a lease
    renewal). Readiness asks for a recent beat: a process can be alive with its loop stalled."""

    def __init__(self) -> None:
        self._at = time.monotonic()

    def beat(self) -> None:
        """The loop did its work just now."""
        self._at = time.monotonic()

    def age(self) -> float:
        """Seconds since the last beat (or since the pulse was made)."""
        return time.monotonic() - self._at


def pulse_check(pulse: Pulse, max_age: float, what: str = "heartbeat") -> Check:
    """Ready while ``pulse`` beat within the last ``max_age`` seconds."""

    def check() -> None:
        age = pulse.age()
        if age > max_age:
            raise RuntimeError(f"no {what} for {age:.0f} s (more than {max_age:g} s)")

    return check
