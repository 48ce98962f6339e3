"""Result objects to a real Orthanc (Debian package): same study, retries, dead letter, retry.

The export queue lives in the node database; these tests drive it one pass at a time
(:func:`dicom_node.jobs.export.run_due`), as the worker's export thread does every second.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.jobs import export
from dicom_node.jobs.export import Destination, ExportPolicy, ExportState
from tests.analysed_study import Source, analysed_source
from tests.conftest import free_port, require_tool
from tests.export_queue import export_config, export_rows, node_sessions
from tests.orthanc_peer import OrthancPeer, orthanc_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PM = "1.2.840.10008.5.1.4.1.1.30"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    """Orthanc on free ports that rejects associations not addressed to AE title ORTHANC."""
    with orthanc_server(
        tmp_path / "orthanc", name="her2low-export-test", config={"DicomCheckCalledAet": True}
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return analysed_source(tmp_path_factory.mktemp("study"))


def test_objects_land_in_the_source_study(home: Path, orthanc: OrthancPeer, source: Source) -> None:
    require_tool("storescu")
    orthanc.store(source.files)
    sessions = node_sessions()
    dest = Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port)
    config = export_config(home, dest)
    ids = export.export_results(
        sessions, config, analysis=source.analysis, dwi=source.dwi, datasets=source.datasets
    )
    assert len(ids) == 1
    # a retried analysis job queues nothing new (same SR UID, same destination)
    assert not export.export_results(
        sessions, config, analysis=source.analysis, dwi=source.dwi, datasets=source.datasets
    )
    assert export.run_due(sessions, config.destinations, config.policy) == [
        (ids[0], ExportState.DONE)
    ]
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    study = orthanc.get(f"/studies/{studies[0]}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == source.study_uid
    series = [orthanc.get(f"/series/{s}") for s in study["Series"]]
    (row,) = export_rows(sessions)
    sent = [pydicom.dcmread(p, stop_before_pixels=True) for p in row.file_paths()]
    assert [str(ds.SOPClassUID) for ds in sent] == [SR, SEG, PM, PM, PM, KOS]
    got = sorted(
        (s["MainDicomTags"]["SeriesInstanceUID"], s["MainDicomTags"]["Modality"]) for s in series
    )
    expected = [(source.series_uid, "MR")] + [(ds.SeriesInstanceUID, ds.Modality) for ds in sent]
    assert got == sorted(expected)  # the source series, and each object in a series of its own
    assert len(orthanc.get("/instances")) == len(source.files) + 6


def test_refused_then_dead_then_retried_sends_each_object_once(
    home: Path, orthanc: OrthancPeer, source: Source, capsys: pytest.CaptureFixture[str]
) -> None:
    from her2low.cli import main

    sessions = node_sessions()
    wrong = Destination("pacs", "NOT-ORTHANC", "127.0.0.1", orthanc.dicom_port)
    config = export_config(home, wrong, max_attempts=3, backoff_seconds=0.2)
    (export_id,) = export.export_results(
        sessions, config, analysis=source.analysis, dwi=source.dwi, datasets=source.datasets
    )
    states: list[ExportState] = []
    waits: list[float] = []
    deadline = time.monotonic() + 30
    while ExportState.DEAD not in states and time.monotonic() < deadline:
        for _, state in export.run_due(sessions, config.destinations, config.policy):
            states.append(state)
            (row,) = export_rows(sessions)
            waits.append(row.next_attempt_at - row.updated_at)
        time.sleep(0.05)
    assert states == [ExportState.PENDING, ExportState.PENDING, ExportState.DEAD]
    assert waits[0] == pytest.approx(0.2, abs=0.01) and waits[1] == pytest.approx(0.4, abs=0.01)
    (row,) = export_rows(sessions)
    # Orthanc answers A-ASSOCIATE-RJ and resets the connection at once; on a busy machine the
    # reset can discard the unread reject, so the peer looks unreachable. Both are refusals
    # (the rejection's own wording: test_an_association_rejection_is_called_rejected).
    assert row.attempts == 3 and row.last_error.startswith(("rejected", "unreachable"))
    assert orthanc.get("/instances") == []
    # dead letters stay dead: nothing is sent until someone retries
    assert export.run_due(sessions, config.destinations, config.policy) == []

    assert main(["export", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["counts"]["dead"] == 1 and listed["exports"][0]["id"] == export_id

    fixed = Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port)
    assert main(["export", "retry", "--all"]) == 0
    assert export.run_due(sessions, (fixed,), config.policy) == [(export_id, ExportState.DONE)]
    # a second retry of a delivered export re-sends the same SOP Instance UIDs: no duplicates
    assert main(["export", "retry", str(export_id)]) == 0
    assert export.run_due(sessions, (fixed,), config.policy) == [(export_id, ExportState.DONE)]
    (row,) = export_rows(sessions)
    uids = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in row.file_paths()
    ]
    assert len(uids) == 6
    assert all(len(orthanc.find_instance(uid)) == 1 for uid in uids)
    assert len(orthanc.get("/instances")) == 6


def test_destinations_by_calling_aet_and_backoff() -> None:
    everyone = Destination.from_dict({"ae_title": "PACS", "host": "h", "port": 104})
    only = Destination.from_dict(
        {"name": "mod", "ae_title": "PACS", "host": "h", "port": 104, "calling_aets": ["CT1"]}
    )
    assert everyone.name == "PACS@h:104" and everyone.serves("ANY")
    assert only.serves("CT1") and not only.serves("MR2")
    policy = ExportPolicy(calling_aet="X", backoff_seconds=30, backoff_max_seconds=100)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [30, 60, 100, 100]
    from her2low.core.settings import ConfigurationError

    with pytest.raises(ConfigurationError):
        Destination.from_dict({"ae_title": "PACS", "host": "h"})


def test_the_node_never_analyses_objects_it_produced(
    home: Path, source: Source, tmp_path: Path
) -> None:
    """Our SR, SEG and maps routed back by a PACS are recognised by equipment identity."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_node.analysis.outputs import build_outputs
    from dicom_node.jobs.pipeline import PipelineSettings, Skipped, run_pipeline
    from dicom_node.receiving.ingest import Ingestor
    from dicom_node.receiving.storage import FileStore
    from her2low.core.settings import load_settings

    settings = load_settings()
    sessions = node_sessions()
    ingestor = Ingestor(FileStore(settings.storage_dir), sessions)
    files = build_outputs(source.analysis, source.dwi, source.datasets).write(tmp_path / "own")
    series = []
    for path in files:  # renamed, as a PACS would: the file name plays no part
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ingestor.ingest(
            path.read_bytes(),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        series.append(str(ds.SeriesInstanceUID))
    config = PipelineSettings(results_url="http://127.0.0.1:9", results_token="t", quiet_seconds=1)
    for uid in series:
        with pytest.raises(Skipped, match="result object this node produced") as skipped:
            run_pipeline(sessions, uid, config)
        assert skipped.value.role == "own_result"


def test_worker_sends_results_of_a_received_study(tmp_path: Path, orthanc: OrthancPeer) -> None:
    """The whole path: storescu → node → worker (analysis, objects, export thread) → Orthanc."""
    from tests.system import running_system

    require_tool("storescu")
    destinations = [
        {
            "name": "pacs",
            "ae_title": "ORTHANC",
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "calling_aets": ["PACS"],
        }
    ]
    with running_system(
        tmp_path,
        HER2LOW_NODE_EXPORT_DESTINATIONS=json.dumps(destinations),
        HER2LOW_NODE_EXPORT_BACKOFF_SECONDS="1",
    ) as system:
        study = tmp_path / "study"
        made = system.run("synth", "--out", str(study), "--seed", "12")
        assert made.returncode == 0, made.stderr
        sent = subprocess.run(
            [
                "storescu",
                "-aet",
                "PACS",
                "-aec",
                "HER2LOW",
                "+sd",
                "+r",
                "-xe",
                "-R",
                "127.0.0.1",
                str(system.node_port),
                str(study / "dwi"),
                str(study / "seg"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 240
        listed: dict[str, Any] = {}
        while time.monotonic() < deadline:
            out = system.run("export", "list", "--json")
            if out.returncode == 0:
                listed = json.loads(out.stdout)
                if listed["counts"]["done"]:
                    break
            time.sleep(2)
        assert listed.get("counts", {}).get("done", 0) >= 1, system.logs()
    # read once every process has stopped: a revised SR (results_sync) may have followed
    with sqlite3.connect(system.home / "node.db") as db:
        rows = db.execute("SELECT state, paths FROM exports ORDER BY id").fetchall()
    done = [json.loads(paths) for state, paths in rows if state.lower() == "done"]
    manifest = json.loads((study / "manifest.json").read_text())
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    tags = orthanc.get(f"/studies/{studies[0]}")["MainDicomTags"]
    assert tags["StudyInstanceUID"] == manifest["study_instance_uid"]
    # SR + 3 maps + KOS: the study's own SEG is referenced by the SR, not copied
    first = [pydicom.dcmread(p, stop_before_pixels=True) for p in done[0]]
    assert first[0].Modality == "SR" and len(first) == 5
    assert first[-1].SOPClassUID == KOS
    assert len(orthanc.get("/instances")) == sum(len(paths) for paths in done)


def test_a_silent_destination_times_out_and_is_retried_later(home: Path, source: Source) -> None:
    """A peer that accepts TCP but never answers costs one timeout, not a stuck thread."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        port = listener.getsockname()[1]
        sessions = node_sessions()
        dest = Destination("silent", "PACS", "127.0.0.1", port)
        policy = ExportPolicy(calling_aet="HER2LOW", timeout=1.0, backoff_seconds=60)
        (export_id,) = export.schedule(
            sessions,
            destinations=[dest],
            paths=source.files[:1],
            batch_key="k",
            study_uid=source.study_uid,
            source_series_uid=source.series_uid,
            calling_aet="",
        )
        started = time.monotonic()
        assert export.run_due(sessions, [dest], policy) == [(export_id, ExportState.PENDING)]
        assert time.monotonic() - started < 10
        (row,) = export_rows(sessions)
        assert row.last_error.startswith("unreachable") and row.next_attempt_at > time.time() + 50
    finally:
        listener.close()


def test_an_association_rejection_is_called_rejected(home: Path, source: Source) -> None:
    """A peer refusing the called AE title cleanly (A-ASSOCIATE-RJ) is named as a rejection."""
    from pynetdicom import AE, StoragePresentationContexts

    peer = AE(ae_title="PACS")
    peer.require_called_aet = True
    peer.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False)
    try:
        dest = Destination("pacs", "NOT-PACS", "127.0.0.1", port)
        result = export.send(dest, source.files[:1], ExportPolicy(calling_aet="HER2LOW", timeout=5))
    finally:
        server.shutdown()
    assert result.outcome == "rejected", result
    assert result.message == "association rejected by NOT-PACS"


def test_the_sender_turns_off_nagle_on_its_connection(
    home: Path, source: Source, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TCP_NODELAY each C-STORE's tail waited for the peer's delayed ACK (1.46x storescu)."""
    import socket

    from pynetdicom import AE, StoragePresentationContexts, evt

    from dicom_node.jobs import export_scu

    seen: list[int] = []
    original = export_scu._no_delay

    def spy(event: Any) -> None:
        original(event)
        raw = event.assoc.dul.socket.socket
        seen.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(export_scu, "_no_delay", spy)
    peer = AE(ae_title="PACS")
    peer.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    try:
        result = export_scu.store_files(
            source.files[:1], host="127.0.0.1", port=port, called_aet="PACS", calling_aet="N"
        )
    finally:
        server.shutdown()
    assert result.outcome == "success", result
    assert seen == [1]
