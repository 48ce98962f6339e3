"""Shared fixtures: free ports, a migrated home folder, a node running in-process."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from her2low.core.ports import free_port

__all__ = ["free_port"]

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DWI = SHARED / "data" / "dwi"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` installs it (scripts/system-deps.sh)")
    return path


@pytest.fixture
def shared_dwi() -> Path:
    if not SHARED_DWI.is_dir():
        pytest.skip(f"shared vendor data not found at {SHARED_DWI} (CI always has it)")
    return SHARED_DWI


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated HER2LOW_HOME with both databases migrated."""
    from dicom_node.db import MIGRATIONS
    from her2low.core.settings import load_settings

    folder = tmp_path / "home"
    monkeypatch.setenv("HER2LOW_HOME", str(folder))
    monkeypatch.setenv("HER2LOW_NODE_METRICS_PORT", "0")  # side ports: no fixed ports in tests
    monkeypatch.setenv("HER2LOW_WORKER_METRICS_PORT", "0")
    settings = load_settings()
    MIGRATIONS.upgrade(settings.node_database_url)
    return folder


class RunningNode:
    def __init__(self, settings, stop: threading.Event, thread: threading.Thread) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.stop = stop
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.settings.node_port)

    @property
    def side_url(self) -> str:
        """The node's HTTP side port (/healthz, /readyz, /metrics)."""
        return f"http://127.0.0.1:{self.settings.node_metrics_port}"

    def sessions(self):  # type: ignore[no-untyped-def]
        from her2low.core.database import make_engine, session_factory

        return session_factory(make_engine(self.settings.node_database_url))


def start_node(settings) -> RunningNode:  # type: ignore[no-untyped-def]
    """Run the node (SCP + housekeeping) in a thread and wait until it answers C-ECHO."""
    import time

    from dicom_node.processes import run_node
    from her2low.scu import echo

    stop = threading.Event()
    thread = threading.Thread(target=run_node, args=(settings, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if echo(
                "127.0.0.1",
                settings.node_port,
                called_aet=settings.node_ae_title,
                calling_aet=(settings.node_allowed_calling_aets or ["HER2LOW-DEMO"])[0].split("@")[
                    0
                ],
            ):
                break
        except Exception:
            pass
        time.sleep(0.1)
    return RunningNode(settings, stop, thread)


@pytest.fixture
def node_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Environment for a node on a free loopback port with a 1 s quiet period."""
    monkeypatch.setenv("HER2LOW_NODE_PORT", str(free_port()))
    monkeypatch.setenv("HER2LOW_NODE_HOST", "127.0.0.1")
    monkeypatch.setenv("HER2LOW_NODE_QUIET_SECONDS", "1")
    monkeypatch.setenv("HER2LOW_NODE_METRICS_PORT", str(free_port()))  # node.side_url
    return monkeypatch


@pytest.fixture
def node(node_env: pytest.MonkeyPatch) -> Iterator[RunningNode]:
    from her2low.core.settings import load_settings

    running = start_node(load_settings())
    yield running
    running.stop.set()
    running.thread.join(timeout=10)
