"""A real Orthanc (Debian package) as the routing PACS, auto-routing stable series to the node.

DCMTK storescu sends the synthetic study to Orthanc; Orthanc's Lua ``OnStableSeries`` stores
each stable MR/SEG series to the node; the node analyses the diffusion series once. Then the
instance that was held back arrives late: Orthanc re-sends the *whole* series (as it does on
every late instance), the node stores only the new instance and re-runs the analysis once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.analysis.outputs.identification import MANUFACTURER, MODEL_NAME
from tests.conftest import require_tool
from tests.orthanc_peer import OrthancPeer, orthanc_server
from tests.system import System, running_system

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The routing script sites deploy (the test runs the shipped file, not a copy of it).
ROUTE_LUA = Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "route-to-her2low.lua"


@pytest.fixture
def orthanc_for(tmp_path: Path) -> Iterator[Callable[[int], OrthancPeer]]:
    """Start Orthanc routing stable MR/SEG series to the node on ``node_port``."""
    with ExitStack() as stack:

        def start(node_port: int) -> OrthancPeer:
            folder = tmp_path / "orthanc"
            folder.mkdir()
            config = {
                "DicomModalities": {
                    "her2low": {"AET": "HER2LOW", "Host": "127.0.0.1", "Port": node_port}
                },
                "LuaScripts": [str(ROUTE_LUA)],
                "StableAge": 2,
            }
            return stack.enter_context(orthanc_server(folder, config=config))

        yield start


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with running_system(tmp_path, HER2LOW_NODE_QUIET_SECONDS="2") as running:
        yield running


def _node_db(system: System) -> sqlite3.Connection:
    return sqlite3.connect(system.home / "node.db", timeout=30)


def _jobs(system: System, series_uid: str) -> list[str]:
    with _node_db(system) as db:
        return [
            row[0]
            for row in db.execute(
                "SELECT state FROM jobs WHERE series_instance_uid = ? ORDER BY created_at",
                (series_uid,),
            )
        ]


def _wait_jobs(system: System, series_uid: str, done: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _jobs(system, series_uid).count("DONE") >= done:
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs {_jobs(system, series_uid)}\n{system.logs()}")


def test_orthanc_routes_series_and_late_instance_reruns_once(
    system: System, orthanc_for: Callable[[int], OrthancPeer], tmp_path: Path
) -> None:
    require_tool("storescu")
    orthanc = orthanc_for(system.node_port)
    study = tmp_path / "study"
    assert system.run("synth", "--out", str(study), "--seed", "21").returncode == 0
    manifest = json.loads((study / "manifest.json").read_text())
    dwi_uid = manifest["dwi"]["series_instance_uid"]
    seg_uid = manifest["seg"]["series_instance_uid"]
    dwi_files = [study / f for f in manifest["dwi"]["files"]]
    late, early = dwi_files[-1], dwi_files[:-1]

    # the radiologist's SEG is already in the PACS, then the MR series arrive
    orthanc.store([study / f for f in manifest["seg"]["files"]])
    _wait_jobs(system, seg_uid, 1)
    orthanc.store(early + [study / f for f in manifest["t2"]["files"]])
    _wait_jobs(system, dwi_uid, 1)
    time.sleep(4)  # longer than both quiet periods: nothing else may start
    assert _jobs(system, dwi_uid) == ["DONE"]
    with _node_db(system) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM instances WHERE series_instance_uid = ?", (dwi_uid,)
        ).fetchone()
    assert count == len(early)

    # the late instance: Orthanc re-sends the whole series; only one instance is new
    orthanc.store([late])
    _wait_jobs(system, dwi_uid, 2)
    time.sleep(4)
    assert _jobs(system, dwi_uid) == ["DONE", "DONE"]
    with _node_db(system) as db:
        rows = db.execute(
            "SELECT count(*), max(version) FROM instances WHERE series_instance_uid = ?", (dwi_uid,)
        ).fetchone()
        (series_state,) = db.execute(
            "SELECT state FROM series WHERE series_instance_uid = ?", (dwi_uid,)
        ).fetchone()
    assert rows == (len(dwi_files), 1)  # nothing stored twice, no spurious versions
    assert series_state == "DONE"
    result = system.wait_result(manifest["study_instance_uid"])
    assert result["provenance"]["roi"]["source"] == "seg"

    # an MR series the node wrote (its parametric maps are MR) is never routed back to it
    own = pydicom.dcmread(late)
    own.SeriesInstanceUID = own.SOPInstanceUID = generate_uid()
    own.file_meta.MediaStorageSOPInstanceUID = own.SOPInstanceUID
    own.Manufacturer, own.ManufacturerModelName = MANUFACTURER, MODEL_NAME
    own.save_as(tmp_path / "own.dcm")
    orthanc.store([tmp_path / "own.dcm"])
    time.sleep(6)  # past StableAge and the routing it would trigger
    with _node_db(system) as db:
        (routed,) = db.execute(
            "SELECT count(*) FROM instances WHERE series_instance_uid = ?",
            (own.SeriesInstanceUID,),
        ).fetchone()
    assert routed == 0
