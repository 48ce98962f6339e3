"""kill -9 of the node during a transfer: every acknowledged instance survives and is analysed."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.presentation import build_context

from tests.system import running_system

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _send_until_killed(files: list[Path], port: int, kill_after: int, kill) -> list[str]:  # type: ignore[no-untyped-def]
    """C-STORE files in order; SIGKILL the node after ``kill_after`` successes."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [build_context(str(datasets[0].SOPClassUID), "1.2.840.10008.1.2.1")]
    assoc = ae.associate("127.0.0.1", port, ae_title="HER2LOW")
    assert assoc.is_established
    acknowledged: list[str] = []
    for ds in datasets:
        if len(acknowledged) == kill_after:
            kill()
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            break
        if getattr(status, "Status", None) == 0x0000:
            acknowledged.append(str(ds.SOPInstanceUID))
        if not assoc.is_established:
            break
    if assoc.is_established:
        assoc.abort()
    return acknowledged


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    with running_system(tmp_path, HER2LOW_NODE_QUIET_SECONDS="2") as system:
        study = tmp_path / "study"
        assert system.run("synth", "--out", str(study), "--seed", "5").returncode == 0
        manifest = json.loads((study / "manifest.json").read_text())
        files = [study / f for f in manifest["dwi"]["files"]]
        node = system.procs[0]
        acknowledged = _send_until_killed(
            files, system.node_port, 60, lambda: node.send_signal(signal.SIGKILL)
        )
        node.wait(timeout=10)
        assert 55 <= len(acknowledged) < len(files)

        system.procs.remove(node)
        system.start("node")  # restart: recovery, then business as usual
        time.sleep(1.5)
        with sqlite3.connect(system.home / "node.db") as db:
            stored = {
                row[0]: row[1] for row in db.execute("SELECT sop_instance_uid, path FROM instances")
            }
        missing = [uid for uid in acknowledged if uid not in stored]
        assert missing == [], f"{len(missing)} acknowledged instances lost"
        for uid in acknowledged:
            assert Path(stored[uid]).stat().st_size > 0

        # the router re-sends what failed; the series completes and is analysed
        from her2low.scu import send_files

        deadline = time.monotonic() + 30
        while True:
            try:
                report = send_files(
                    files + [study / f for f in manifest["seg"]["files"]],
                    "127.0.0.1",
                    system.node_port,
                    calling_aet="MODALITY",
                )
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert not report.failed
        result = system.wait_result(manifest["study_instance_uid"])
        assert result["series_instance_uid"] == manifest["dwi"]["series_instance_uid"]
