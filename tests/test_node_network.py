"""The node over real associations, with DCMTK and pynetdicom as peers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.db import Instance
from her2low.core.settings import load_settings
from tests.conftest import RunningNode, require_tool, start_node
from tests.node_data import encode, garbage_file, mr_dataset

pytestmark = pytest.mark.integration

_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool(args[0])
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=_ENV)


@pytest.fixture(autouse=True)
def _send_files_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send test files byte-for-byte (pynetdicom would otherwise decode and re-encode them)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _assoc(port: int, calling: str = "PEER", called: str = "HER2LOW"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ExplicitVRLittleEndian)  # MR Image
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_echoscu_gets_success(node: RunningNode) -> None:
    result = _dcmtk("echoscu", "-aet", "PEER", "-aec", "HER2LOW", "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr


def test_wrong_called_ae_is_rejected_with_the_standard_reason(node: RunningNode) -> None:
    result = _dcmtk("echoscu", "-aet", "PEER", "-aec", "NOTUS", "127.0.0.1", str(node.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_unknown_calling_ae_is_rejected(node_env: pytest.MonkeyPatch) -> None:
    node_env.setenv("HER2LOW_NODE_ALLOWED_CALLING_AETS", '["ORTHANC"]')
    running = start_node(load_settings())
    try:
        result = _dcmtk(
            "echoscu", "-aet", "STRANGER", "-aec", "HER2LOW", "127.0.0.1", str(running.port)
        )
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stderr
        ok = _dcmtk("echoscu", "-aet", "ORTHANC", "-aec", "HER2LOW", "127.0.0.1", str(running.port))
        assert ok.returncode == 0, ok.stderr
    finally:
        running.stop.set()
        running.thread.join(timeout=10)


def test_storescu_series_is_stored_durably(node: RunningNode, shared_dwi: Path) -> None:
    folder = shared_dwi / "ge_signa_classic" / "dicom"
    result = _dcmtk(
        "storescu",
        "-aet",
        "PEER",
        "-aec",
        "HER2LOW",
        "+sd",
        "+r",
        "127.0.0.1",
        str(node.port),
        str(folder),
    )
    assert result.returncode == 0, result.stderr
    with node.sessions()() as s:
        rows = s.scalars(select(Instance)).all()
    assert len(rows) == len(list(folder.iterdir())) == 14
    for row in rows:
        assert Path(row.path).stat().st_size == row.size
    # a router re-sending the whole series: every instance succeeds, nothing stored twice
    again = _dcmtk(
        "storescu",
        "-aet",
        "PEER",
        "-aec",
        "HER2LOW",
        "+sd",
        "+r",
        "127.0.0.1",
        str(node.port),
        str(folder),
    )
    assert again.returncode == 0, again.stderr
    with node.sessions()() as s:
        assert s.query(Instance).count() == 14


def test_malformed_dataset_gets_c000_and_node_keeps_serving(
    node: RunningNode, tmp_path: Path
) -> None:
    assoc = _assoc(node.port)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(garbage_file(tmp_path / "bad.dcm"))
        assert int(status.Status) == 0xC000
        good = mr_dataset(generate_uid(), generate_uid())
        assert int(assoc.send_c_store(good).Status) == 0x0000  # same association still works
    finally:
        assoc.release()
    result = _dcmtk("echoscu", "-aet", "PEER", "-aec", "HER2LOW", "127.0.0.1", str(node.port))
    assert result.returncode == 0


def test_dataset_in_the_wrong_sop_class_gets_a900(node: RunningNode, tmp_path: Path) -> None:
    data = encode(mr_dataset(generate_uid(), generate_uid()))
    # offered as CT (the file meta comes first; both UIDs have 25 characters), content says MR
    data = data.replace(b"1.2.840.10008.5.1.4.1.1.4", CTImageStorage.encode(), 1)
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(data)
    assoc = _assoc(node.port)
    try:
        status = assoc.send_c_store(path)
        assert int(status.Status) == 0xA900
    finally:
        assoc.release()
    with node.sessions()() as s:
        assert s.query(Instance).count() == 0
