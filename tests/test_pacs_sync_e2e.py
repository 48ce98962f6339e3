"""Node and the REAL service app together: descriptors in the service become a revised SR in
the PACS, and a dead export shows in the service's stored states (issue 14).

The service is the real Flask app (``tests/test_cds_support.start_service``: werkzeug on a free
port, its own migrated database, the fake model runtime); the node side is the real export
queue and results-sync code on a migrated node database, driven one pass at a time; the PACS is
a pynetdicom Storage SCP that accepts only the called AE title ``PACS``, so a second destination
addressed ``WRONG`` is refused and dead-lettered.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from test_cds_support import (  # imported flat, as the service's own tests do
    MASS_DESCRIPTORS,
    RESULTS_TOKEN,
    Service,
    start_service,
    stop_service,
)

from dicom_node.analysis.series_analysis import analyse
from dicom_node.jobs import export, results_sync
from dicom_node.jobs.export import Destination, ExportConfig, ExportPolicy, ExportState
from dicom_node.jobs.pipeline import build_payload
from dicom_node.jobs.publish import publish
from dicom_node.series.assemble import assemble_dwi
from dicom_node.synth import write_study
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Pacs:
    port: int
    received: list[Dataset] = field(default_factory=list)


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]

    got = Pacs(port=free_port())
    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    ae.add_supported_context(ComprehensiveSRStorage)

    def handle_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.received.append(ds)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", got.port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    try:
        yield got
    finally:
        server.shutdown()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    (tmp_path / "service").mkdir()
    svc = start_service(tmp_path / "service")
    yield svc
    stop_service(svc)


def _sessions() -> Any:
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    return session_factory(make_engine(load_settings().node_database_url))


def test_descriptors_become_a_revised_sr_and_a_dead_export_is_stored(
    home: Path, tmp_path: Path, pacs: Pacs, service: Service
) -> None:
    from cds_service.app import state_of

    tmp_path.joinpath("study").mkdir()
    manifest = write_study(tmp_path / "study", seed=5)
    datasets = [pydicom.dcmread(tmp_path / "study" / f) for f in manifest.dwi.files]
    dwi = assemble_dwi(datasets)
    analysis = analyse(dwi)
    series_uid = str(dwi.series_instance_uid)
    # what the worker does: publish the numbers, then write and queue the objects
    published = publish(
        service.url, RESULTS_TOKEN, build_payload(datasets[0], analysis, series_uid)
    )
    sessions = _sessions()
    good = Destination("pacs", "PACS", "127.0.0.1", pacs.port)
    wrong = Destination("wrong", "WRONG", "127.0.0.1", pacs.port)
    config = ExportConfig(
        (good, wrong), home / "outputs", ExportPolicy(calling_aet="HER2LOW", max_attempts=1)
    )
    sync = results_sync.SyncConfig(
        client=results_sync.ResultsClient(service.url, RESULTS_TOKEN), export=config
    )
    assert (
        len(export.export_results(sessions, config, analysis=analysis, dwi=dwi, datasets=datasets))
        == 2
    )
    first = export.run_due(sessions, config.destinations, config.policy)
    assert sorted(state for _, state in first) == sorted([ExportState.DONE, ExportState.DEAD])
    originals = {str(ds.SOPInstanceUID) for ds in pacs.received}

    # the node tells the service; the service stores one state per destination
    assert results_sync.report_exports(sessions, sync.client) == (1, 0)
    stored = {
        s.destination: s for s in state_of(service.app).store.pacs.exports_for(published.result_id)
    }
    assert stored["wrong"].state is ExportState.DEAD and stored["wrong"].last_error
    assert stored["pacs"].state is ExportState.DONE and stored["pacs"].objects == len(originals)

    # before any descriptors the service scores on the numbers alone: a likelihood the
    # original SR does not carry is a revision too (instance 2)
    before, _ = results_sync.poll_assessments(sessions, sync)
    assert before == 1
    # the radiologist enters descriptors in the service; the next poll revises the SR
    entered = service.put_descriptors(published.result_id, MASS_DESCRIPTORS)
    assert entered.status_code == 200, entered.text
    assert results_sync.poll_assessments(sessions, sync) == (1, 0)
    assert results_sync.poll_assessments(sessions, sync) == (0, 0)  # nothing new: no duplicate
    (current,) = results_sync.parse_page(
        sync.client.get_assessments(results_sync.get_cursor(sessions) - dt.timedelta(days=1), 50)
    ).assessments
    sent = export.run_due(sessions, config.destinations, config.policy)  # each revision, once
    assert sorted(state for _, state in sent) == sorted(
        [ExportState.DONE, ExportState.DEAD] * (before + 1)
    )

    srs = sorted(
        (ds for ds in pacs.received if ds.SOPClassUID == SR_STORAGE),
        key=lambda ds: int(ds.InstanceNumber),
    )
    assert [int(ds.InstanceNumber) for ds in srs] == list(range(1, before + 3))
    original_sr, previous, new = srs[0], srs[-2], srs[-1]
    assert str(original_sr.SOPInstanceUID) in originals
    assert {str(ds.SeriesInstanceUID) for ds in srs} == {str(original_sr.SeriesInstanceUID)}
    assert new.StudyInstanceUID == datasets[0].StudyInstanceUID
    pred = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.SOPInstanceUID
    sr = hd.sr.Comprehensive3DSR.from_dataset(new)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    evaluations = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
    assert ("300842002", "49608001") in evaluations  # Shape = Irregular, as entered
    assert ("111037", "129742005") in evaluations  # Margins = Spiculated lesion
    likelihood = [m.value for m in group.get_measurements() if m.name.value == "HER2LOWP"]
    assert current.probability is not None and current.model_name  # the combined model
    assert likelihood == [pytest.approx(current.probability)]
    assert new.CompletionFlag == "COMPLETE" and new.VerificationFlag == "UNVERIFIED"

    # and the service now holds the states of the analysis with its revision
    results_sync.report_exports(sessions, sync.client)
    stored = {
        s.destination: s for s in state_of(service.app).store.pacs.exports_for(published.result_id)
    }
    assert stored["wrong"].state is ExportState.DEAD
    assert stored["pacs"].state is ExportState.DONE
    assert stored["pacs"].objects == len(originals) + before + 1
