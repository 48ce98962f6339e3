"""The node's export queue as the export tests see it: its sessions, a config, its rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dicom_node.jobs import export
from dicom_node.jobs.export import Destination, Export, ExportConfig, ExportPolicy, ExportState


def node_sessions() -> Any:
    """Sessions on the node database of the current HER2LOW_HOME (the ``home`` fixture's)."""
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    return session_factory(make_engine(load_settings().node_database_url))


def export_config(home: Path, dest: Destination, **policy: Any) -> ExportConfig:
    """One destination, outputs under ``home``, a 5 s timeout and the given policy fields."""
    return ExportConfig(
        destinations=(dest,),
        outputs_dir=home / "outputs",
        policy=ExportPolicy(calling_aet="HER2LOW", timeout=5, **policy),
    )


def export_rows(sessions: Any) -> list[Export]:
    """Every export row, oldest first, detached from its session."""
    with sessions() as session:
        rows = list(session.query(Export).order_by(Export.id))
        session.expunge_all()
        return rows


def states_until_dead(
    sessions: Any, config: ExportConfig, timeout: float = 30
) -> list[ExportState]:
    """Run the due exports until one is dead-lettered (or ``timeout`` s): every state reached."""
    states: list[ExportState] = []
    deadline = time.monotonic() + timeout
    while ExportState.DEAD not in states and time.monotonic() < deadline:
        states += [s for _, s in export.run_due(sessions, config.destinations, config.policy)]
        time.sleep(0.05)
    return states
