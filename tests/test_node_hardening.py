"""The node against a hostile or careless peer: decompression bombs, pixel data that contradict
the header, duplicates in another encoding, slot hogging, world-readable files, raw warnings.

Every check goes through real associations (pynetdicom as the peer) into an in-process node.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from dicom_node.db import Instance, Series
from dicom_node.receiving.checks import TooLarge, inflated_size_within
from dicom_node.receiving.ingest import Ingestor
from dicom_node.receiving.status import StoreStatus
from dicom_node.receiving.storage import FileStore, content_digest
from her2low.core import logs
from her2low.core.database import make_engine, session_factory
from her2low.core.private_files import check_private
from her2low.core.settings import load_settings
from tests.conftest import RunningNode, free_port, start_node
from tests.node_data import encode, mr_dataset
from tests.node_scp import running_scp

VERIFICATION = "1.2.840.10008.1.1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _send_files_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files byte-for-byte: pynetdicom would decode and re-encode (and so repair) them."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _associate(port: int, *syntaxes: str, calling: str = "PEER") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    for syntax in syntaxes or [ExplicitVRLittleEndian]:  # one context each: all get accepted
        ae.add_requested_context(MRImageStorage, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="HER2LOW")
    assert assoc.is_established
    return assoc


def _store_file(assoc: Association, data: bytes, folder: Path) -> Dataset:
    path = folder / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    return assoc.send_c_store(path)


def _saved(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return buffer.getvalue()


def _instances(node: RunningNode) -> list[Instance]:
    with node.sessions()() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


# --------------------------------------------------------------------- 1. decompression bomb


def _bomb(rows: int = 2048) -> bytes:
    """An MR instance whose zero Pixel Data deflate ~1000:1 (8 MiB inflated, ~10 kB sent)."""
    ds = mr_dataset(generate_uid(), generate_uid())
    ds.Rows = ds.Columns = rows
    ds.PixelData = bytes(rows * rows * 2)
    return _saved(ds, DeflatedExplicitVRLittleEndian)


@pytest.mark.integration
def test_deflated_bomb_gets_a700_nothing_stored_and_the_node_keeps_serving(
    node_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node_env.setenv("HER2LOW_NODE_MAX_INSTANCE_BYTES", str(4 << 20))
    node = start_node(load_settings())
    try:
        bomb = _bomb()
        assert len(bomb) < 64 << 10
        assoc = _associate(node.port, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)
        try:
            status = _store_file(assoc, bomb, tmp_path)
            assert int(status.Status) == StoreStatus.OUT_OF_RESOURCES
            assert "node_max_instance_bytes" in str(status.get("ErrorComment", ""))
            small = mr_dataset(generate_uid(), generate_uid())
            assert (
                int(
                    _store_file(
                        assoc, _saved(small, DeflatedExplicitVRLittleEndian), tmp_path
                    ).Status
                )
                == StoreStatus.SUCCESS
            )  # within the bound: stored
        finally:
            assoc.release()
        assert [i.sop_instance_uid for i in _instances(node)] == [str(small.SOPInstanceUID)]
        assert not list(
            node.settings.storage_dir.rglob(
                f"*{dcmread(BytesIO(bomb), stop_before_pixels=True).SOPInstanceUID}*"
            )
        )
        again = _associate(node.port)
        assert int(again.send_c_echo().Status) == 0
        again.release()
    finally:
        node.stop.set()
        node.thread.join(timeout=10)


@pytest.mark.integration
def test_data_set_past_the_bound_aborts_the_association_while_it_streams(
    node_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node_env.setenv("HER2LOW_NODE_MAX_INSTANCE_BYTES", str(1 << 20))
    node = start_node(load_settings())
    try:
        big = mr_dataset(generate_uid(), generate_uid())
        big.Rows = big.Columns = 1024  # 2 MiB of pixels, not compressible by the transfer
        big.PixelData = bytes(1024 * 1024 * 2)
        assoc = _associate(node.port)
        _store_file(assoc, encode(big), tmp_path)
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted  # not buffered to the end and answered
        assert _instances(node) == []
        again = _associate(node.port)
        assert int(again.send_c_store(mr_dataset(generate_uid(), generate_uid())).Status) == 0
        again.release()
    finally:
        node.stop.set()
        node.thread.join(timeout=10)


def test_encoded_size_is_bounded_too(home: Path) -> None:
    settings = load_settings()
    ingestor = Ingestor(
        FileStore(settings.storage_dir),
        session_factory(make_engine(settings.node_database_url)),
        max_instance_bytes=1000,
    )
    ds = mr_dataset(generate_uid(), generate_uid())
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(64 * 64 * 2)
    outcome = ingestor.ingest(
        encode(ds),
        sop_class_uid=MRImageStorage,
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert outcome.status is StoreStatus.OUT_OF_RESOURCES
    assert "node_max_instance_bytes" in outcome.detail


def test_the_file_meta_decides_deflate_not_the_callers_word(home: Path) -> None:
    """``recover`` re-ingests files from disk, naming the syntax itself: still bounded."""
    settings = load_settings()
    ingestor = Ingestor(
        FileStore(settings.storage_dir),
        session_factory(make_engine(settings.node_database_url)),
        max_instance_bytes=4 << 20,
    )
    bomb = _bomb()
    sop = str(dcmread(BytesIO(bomb), stop_before_pixels=True).SOPInstanceUID)
    outcome = ingestor.ingest(
        bomb,
        sop_class_uid=MRImageStorage,
        sop_instance_uid=sop,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert outcome.status is StoreStatus.OUT_OF_RESOURCES, outcome


def test_inflating_stops_at_the_bound() -> None:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(bytes(64 << 20)) + packer.flush()
    assert inflated_size_within(deflated, 64 << 20) == 64 << 20
    with pytest.raises(TooLarge):
        inflated_size_within(deflated, 1 << 20)


# --------------------------------------------------------- 2. pixel data against the header


def _contradicting() -> dict[str, bytes]:
    """Instances whose Pixel Data contradict their header, by what they get wrong."""
    cases: dict[str, bytes] = {}
    half = mr_dataset(generate_uid(), generate_uid())
    half.PixelData = bytes(16)  # 4x4x16 bits imply 32
    cases["Pixel Data has 16 bytes"] = encode(half)
    zero_bits = mr_dataset(generate_uid(), generate_uid())
    zero_bits.BitsAllocated = 0
    cases["BitsAllocated 0"] = encode(zero_bits)
    big = mr_dataset(generate_uid(), generate_uid())
    big.Rows = big.Columns = 512
    big.PixelData = np.zeros((96, 192), np.uint16).tobytes()
    cases["header implies 524288"] = encode(big)
    frames = mr_dataset(generate_uid(), generate_uid())
    frames.NumberOfFrames = 3
    frames.PixelData = encapsulate([b"\x00" * 10, b"\x00" * 10], has_bot=False)  # 3 frames
    frames["PixelData"].VR = "OB"
    cases["2 fragments for 3 frames"] = _saved(frames, RLELossless)
    table = mr_dataset(generate_uid(), generate_uid())
    table.NumberOfFrames = 2
    table.PixelData = encapsulate([b"\x00" * 10, b"\x00" * 10], has_bot=True)
    table["PixelData"].VR = "OB"
    raw = bytearray(_saved(table, RLELossless))
    at = raw.index(b"\xfe\xff\x00\xe0\x08\x00\x00\x00")  # Basic Offset Table of 2 entries
    raw[at + 4 : at + 8] = (12).to_bytes(4, "little")  # claims 3: now the items misparse
    cases["encapsulated Pixel Data"] = bytes(raw)
    return cases


@pytest.mark.integration
def test_pixel_data_contradicting_the_header_get_a900_naming_the_problem(
    node: RunningNode, tmp_path: Path
) -> None:
    assoc = _associate(node.port, ExplicitVRLittleEndian, RLELossless)
    try:
        for problem, data in _contradicting().items():
            status = _store_file(assoc, data, tmp_path)
            assert int(status.Status) == StoreStatus.DATASET_MISMATCH, problem
            assert problem in str(status.ErrorComment), (problem, status.ErrorComment)
        good = mr_dataset(generate_uid(), generate_uid(), value=7)
        assert int(_store_file(assoc, encode(good), tmp_path).Status) == 0
        odd = mr_dataset(generate_uid(), generate_uid())
        odd.Rows, odd.Columns, odd.BitsAllocated, odd.BitsStored, odd.HighBit = 3, 3, 8, 8, 7
        odd.PixelData = bytes(10)  # 9 bytes and the pad byte (PS3.5 8.1.1)
        assert int(_store_file(assoc, encode(odd), tmp_path).Status) == 0
        compressed = mr_dataset(generate_uid(), generate_uid(), value=5)
        compressed.compress(RLELossless)
        assert int(_store_file(assoc, _saved(compressed, RLELossless), tmp_path).Status) == 0
    finally:
        assoc.release()
    assert len(_instances(node)) == 3  # only the consistent ones


# ----------------------------------------------------------- 3. duplicates judged by content


@pytest.mark.integration
def test_same_instance_in_another_transfer_syntax_is_a_duplicate(
    node: RunningNode, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    original = mr_dataset(study, series, value=3)
    sop = str(original.SOPInstanceUID)
    assoc = _associate(node.port, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
    try:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            assert int(_store_file(assoc, _saved(original, syntax), tmp_path).Status) == 0
        compressed = mr_dataset(study, series, sop=sop, value=3)
        compressed.compress(RLELossless, generate_instance_uid=False)
        assert int(_store_file(assoc, _saved(compressed, RLELossless), tmp_path).Status) == 0
        with node.sessions()() as session:
            row = session.get(Series, series)
            assert row is not None and row.generation == 1  # nothing re-opened
        assert [i.version for i in _instances(node)] == [1]
        changed = mr_dataset(study, series, sop=sop, value=4)  # a real change
        assert (
            int(_store_file(assoc, _saved(changed, ImplicitVRLittleEndian), tmp_path).Status) == 0
        )
    finally:
        assoc.release()
    assert [i.version for i in _instances(node)] == [1, 2]


def test_content_digest_sees_values_not_encoding() -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), value=9)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    item = Dataset()
    item.CodeValue = "T-04000"
    ds.AnatomicRegionSequence = [item]
    explicit = content_digest(_saved(ds, ExplicitVRLittleEndian))
    assert explicit is not None
    assert content_digest(_saved(ds, ImplicitVRLittleEndian)) == explicit
    assert content_digest(_saved(ds, DeflatedExplicitVRLittleEndian)) == explicit
    item.CodeValue = "T-04001"
    assert content_digest(_saved(ds, ImplicitVRLittleEndian)) != explicit


# ------------------------------------------------------------------ 4. association slots


def _attempt(port: int, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="HER2LOW")


def _local_limit(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "association was not rejected"
    rsp = assoc.acceptor.primitive
    assert rsp is not None
    return (int(rsp.result), int(rsp.result_source), int(rsp.diagnostic))  # type: ignore[arg-type]


@pytest.mark.integration
def test_one_peer_cannot_take_every_association_slot(home: Path) -> None:
    limits = {"node_max_associations_per_aet": 2, "node_max_associations_per_host": 3}
    with running_scp(home, node_max_associations=10, **limits) as port:
        held = [_attempt(port, "HOG"), _attempt(port, "HOG")]
        try:
            assert all(a.is_established for a in held)
            # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), reason 2
            assert _local_limit(_attempt(port, "HOG")) == (2, 3, 2)
            held.append(_attempt(port, "OTHER"))  # another AE title still gets in
            assert held[-1].is_established
            assert _local_limit(_attempt(port, "THIRD")) == (2, 3, 2)  # the host is full
        finally:
            for assoc in held:
                assoc.release()
        deadline = time.monotonic() + 10
        while not (retry := _attempt(port, "HOG")).is_established:
            assert time.monotonic() < deadline, "slots not freed after release"
            time.sleep(0.2)
        retry.release()


@pytest.mark.integration
def test_echo_alone_does_not_keep_an_association(home: Path) -> None:
    with running_scp(home, node_echo_idle_seconds=1.0) as port:
        assoc = _attempt(port, "PINGER")
        assert int(assoc.send_c_echo().Status) == 0
        time.sleep(1.5)
        assert int(assoc.send_c_echo().Status) == 0  # answered, then aborted
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert assoc.is_aborted


# ------------------------------------------------------------------ 5. private home folder


def _too_open(root: Path) -> list[str]:
    wide = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        allowed = 0o750 if path.is_dir() else 0o640
        if mode & ~allowed:
            wide.append(f"{oct(mode)} {path.relative_to(root)}")
    return wide


@pytest.mark.integration
def test_nothing_under_a_fresh_home_is_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cds_service.app import create_app
    from cds_service.db import MIGRATIONS as SERVICE_MIGRATIONS
    from dicom_node.db import MIGRATIONS as NODE_MIGRATIONS

    previous = os.umask(0o022)  # the usual login umask: files 0644 unless the project says so
    try:
        home = tmp_path / "fresh"
        monkeypatch.setenv("HER2LOW_HOME", str(home))
        monkeypatch.setenv("HER2LOW_NODE_PORT", str(free_port()))
        monkeypatch.setenv("HER2LOW_NODE_HOST", "127.0.0.1")
        settings = load_settings()
        NODE_MIGRATIONS.upgrade(settings.node_database_url)
        SERVICE_MIGRATIONS.upgrade(settings.cds_database_url)
        node = start_node(settings)
        try:
            assoc = _associate(node.port)
            assert int(assoc.send_c_store(mr_dataset(generate_uid(), generate_uid())).Status) == 0
            assoc.release()
            app = create_app(settings)
            assert app.test_client().get("/cds-services").status_code < 500
        finally:
            node.stop.set()
            node.thread.join(timeout=10)
        assert list(home.rglob("*.dcm")) and (home / "queue.db").exists()
        assert _too_open(home) == []
    finally:
        os.umask(previous)


def test_start_up_tightens_what_an_older_run_left_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "old"
    (home / "dicom").mkdir(parents=True)
    (home / "secrets").mkdir()
    for name in ("node.db", "cds.db", "secrets/results-api-token"):
        (home / name).write_text("x")
        (home / name).chmod(0o644)
    home.chmod(0o755)
    (home / "dicom").chmod(0o777)
    (home / "secrets").chmod(0o755)
    (home / "notes.txt").write_text("not ours")  # a home set to a shared folder
    (home / "notes.txt").chmod(0o644)
    with caplog.at_level(logging.WARNING):
        changed = check_private(home)
    assert len(changed) == 6
    assert "permissions tightened" in caplog.text
    assert stat.S_IMODE((home / "notes.txt").stat().st_mode) == 0o644  # left alone
    (home / "notes.txt").chmod(0o600)
    assert _too_open(home) == []
    assert check_private(home) == []


# ------------------------------------------------------------- 6. warnings as log events


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    pydicom_level = logging.getLogger("pydicom").level
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
        logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pydicom").setLevel(pydicom_level)


def test_pydicom_warnings_become_one_json_event_each(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    ds.SeriesDescription = "x" * 100  # longer than LO allows: pydicom warns on reading
    data = encode(ds)
    capsys.readouterr()
    logs.configure("INFO", "json")
    dcmread(BytesIO(data)).SeriesDescription  # noqa: B018 - the access warns
    warnings.warn("Invalid value for VR PN: 'DOE^JANE'", UserWarning, stacklevel=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is JSON
    captured = [e for e in events if e["logger"] == "py.warnings"]
    assert len(captured) >= 2 and {e["category"] for e in captured} == {"UserWarning"}
    assert "exceeds the maximum length of 64" in captured[0]["event"]
    assert captured[-1]["event"] == "Invalid value for VR PN: '…'"
    assert all(e["logger"] != "pydicom" for e in events)  # not twice
    assert "DOE" not in "\n".join(lines)


def test_stdlib_captured_warnings_are_parsed_by_the_json_formatter() -> None:
    record = logging.makeLogRecord(
        {
            "name": "py.warnings",
            "levelname": "WARNING",
            "msg": "%s",
            "args": (
                "/x/pydicom/valuerep.py:440: UserWarning: Invalid value 'ABC'\n"
                "  warn_and_log(msg)\n",
            ),
        }
    )
    event = json.loads(logs.JsonFormatter().format(record))
    assert event["event"] == "Invalid value '…'"
    assert event["category"] == "UserWarning"
    assert event["origin"] == "pydicom/valuerep.py:440"


def test_inspect_prints_warnings_as_one_clean_line(tmp_path: Path) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    ds.SeriesDescription = "x" * 100
    (tmp_path / "long.dcm").write_bytes(encode(ds))
    result = subprocess.run(
        [sys.executable, "-m", "her2low", "inspect", str(tmp_path / "long.dcm")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HER2LOW_HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr
    assert "warn_and_log" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("her2low: warning: ") for line in lines), lines
