"""The node's storage SCP alone (no housekeeping, no workers) on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicom_node.receiving import scp
from dicom_node.receiving.ingest import Ingestor
from dicom_node.receiving.storage import FileStore
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import load_settings
from tests.conftest import free_port


@contextmanager
def running_scp(home: Path, **overrides: Any) -> Iterator[int]:
    """Serve the SCP with the settings of ``home`` (the test's HER2LOW_HOME); yields the port.

    ``home`` is taken so a test states which node home it runs in; the settings read it from
    the environment the ``home`` fixture sets.
    """
    port = free_port()
    settings = load_settings(node_host="127.0.0.1", node_port=port, **overrides)
    ingestor = Ingestor(
        FileStore(settings.storage_dir), session_factory(make_engine(settings.node_database_url))
    )
    server = scp.start(settings, ingestor)
    try:
        yield port
    finally:
        server.shutdown()
