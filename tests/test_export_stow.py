"""Result objects by DICOMweb STOW-RS, against a real Orthanc with its DICOMweb plugin.

The Store Instances responses of PS3.18 (200, 202 with FailedSOPSequence, 409, 4xx/5xx) are
read into the same SendResult as a C-STORE, so the export queue retries, dead-letters and
re-sends a STOW-RS destination exactly as it does a DICOM one.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from dicom_node.jobs import export
from dicom_node.jobs.export import (
    Destination,
    DestinationKind,
    ExportConfig,
    ExportPolicy,
    ExportState,
)
from dicom_node.jobs.export_scu import SendOutcome
from dicom_node.jobs.export_stow import parse_stow_response, public_url, stow_files
from her2low.core.settings import ConfigurationError
from tests.analysed_study import Source, analysed_source
from tests.conftest import free_port, require_tool
from tests.export_queue import export_config, export_rows, node_sessions, states_until_dead
from tests.orthanc_peer import OrthancPeer, orthanc_server
from tests.server_pki import server_pki

TOKEN = "s3cr3t-bearer-token-for-the-test"

#: Orthanc's HTTP filter: only a request with our bearer token reaches the DICOMweb plugin.
TOKEN_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if string.sub(uri, 1, 10) ~= '/dicom-web' then
    return true
  end
  return httpHeaders['authorization'] == 'Bearer %s'
end
"""


# --- the response, as PS3.18 10.5.3 describes it ------------------------------------------------


def _ref(uid: str, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.4"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    for tag, code in extra.items():
        item[{"failure": "00081197", "warning": "00081196"}[tag]] = {"vr": "US", "Value": [code]}
    return item


def _body(stored: list[dict[str, Any]] | None, failed: list[dict[str, Any]] | None) -> str:
    body: dict[str, Any] = {}
    if stored is not None:
        body["00081199"] = {"vr": "SQ", **({"Value": stored} if stored else {})}
    if failed is not None:
        body["00081198"] = {"vr": "SQ", **({"Value": failed} if failed else {})}
    return json.dumps(body)


def test_200_with_every_instance_listed_is_success() -> None:
    result = parse_stow_response(200, "OK", _body([_ref("1"), _ref("2")], []), ["1", "2"])
    assert result.outcome is SendOutcome.SUCCESS and result.stored == ["1", "2"]


def test_200_that_lists_none_of_them_is_a_failure() -> None:
    """Orthanc answers 200 to a body it could not read, with both sequences empty."""
    result = parse_stow_response(200, "OK", _body([], []), ["1", "2"])
    assert result.outcome is SendOutcome.FAILED
    assert (
        "2 of 2 instance(s) not stored" in result.message and "1: no reason given" in result.message
    )


def test_202_names_each_failed_instance_and_its_reason() -> None:
    body = _body([_ref("1")], [_ref("2", failure=0xA700), _ref("3", failure=0xC000)])
    result = parse_stow_response(202, "Accepted", body, ["1", "2", "3"])
    assert result.outcome is SendOutcome.FAILED and result.stored == ["1"]
    assert result.message.startswith("HTTP 202 Accepted: 2 of 3 instance(s) not stored")
    assert "2: Failure 0xA700 Refused: Out of Resources" in result.message
    assert "3: Failure 0xC000 Cannot Understand" in result.message


def test_202_with_warnings_only_is_stored_as_a_c_store_warning_is() -> None:
    body = _body([_ref("1", warning=0xB000), _ref("2")], [])
    result = parse_stow_response(202, "Accepted", body, ["1", "2"])
    assert result.outcome is SendOutcome.SUCCESS and result.stored == ["1", "2"]


def test_409_and_errors_and_refusals() -> None:
    conflict = parse_stow_response(409, "Conflict", _body([], [_ref("1", failure=0x0110)]), ["1"])
    assert conflict.outcome is SendOutcome.FAILED
    assert "1: Failure 0x0110 Processing Failure" in conflict.message
    assert parse_stow_response(409, "Conflict", "", ["1"]).message == (
        "HTTP 409 Conflict: no instance stored"
    )
    for status in (401, 403, 404, 415):
        assert parse_stow_response(status, "", "", ["1"]).outcome is SendOutcome.REJECTED
    server = parse_stow_response(503, "Service Unavailable", "<html>patient X</html>", ["1"])
    assert server.outcome is SendOutcome.FAILED
    assert server.message == "HTTP 503 Service Unavailable: server error"  # no body text copied
    assert parse_stow_response(400, "Bad Request", "", ["1"]).message == (
        "HTTP 400 Bad Request: request not accepted"
    )
    # nginx's ssl_verify_client pages get a hint of our own; the page is not copied
    page = "<html><head><title>400 No required SSL certificate was sent</title></head></html>"
    hint = parse_stow_response(400, "Bad Request", page, ["1"])
    assert hint.outcome is SendOutcome.FAILED and "title" not in hint.message
    assert "wants a client certificate and got none: give this destination tls_cert" in (
        hint.message
    )
    assert parse_stow_response(500, "", page, ["1"]).message == "HTTP 500: server error"


def test_an_xml_response_is_read_too() -> None:
    xml = """<?xml version="1.0"?>
    <NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
      <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
        <DicomAttribute tag="00081155" vr="UI"><Value number="1">2</Value></DicomAttribute>
        <DicomAttribute tag="00081197" vr="US"><Value number="1">43264</Value></DicomAttribute>
      </Item></DicomAttribute>
      <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
        <DicomAttribute tag="00081155" vr="UI"><Value number="1">1</Value></DicomAttribute>
      </Item></DicomAttribute>
    </NativeDicomModel>"""
    result = parse_stow_response(202, "Accepted", xml, ["1", "2"])
    assert result.outcome is SendOutcome.FAILED and result.stored == ["1"]
    assert "2: Failure 0xA900 Data Set Does Not Match SOP Class" in result.message


def test_stow_entries_in_the_settings() -> None:
    dest = Destination.from_dict(
        {
            "stow_url": "https://pacs.example.org/dicom-web/studies",
            "token_file": "/run/secrets/pacs-token",
            "tls_ca": "/etc/ssl/pacs-ca.pem",
            "calling_aets": ["MR1"],
        }
    )
    assert (
        dest.kind is DestinationKind.STOW and dest.name == "stow:pacs.example.org/dicom-web/studies"
    )
    assert dest.token_file == "/run/secrets/pacs-token" and dest.tls_ca == "/etc/ssl/pacs-ca.pem"
    assert dest.serves("MR1") and not dest.serves("CT2")
    dimse = Destination.from_dict({"ae_title": "PACS", "host": "h", "port": 104})
    assert dimse.kind is DestinationKind.DIMSE
    bad_entries: list[tuple[dict[str, Any], str]] = [
        ({"stow_url": "ftp://pacs/studies"}, "http"),
        ({"stow_url": "https://user:pw@pacs/studies"}, "token_file"),
        ({"stow_url": "https://pacs/studies", "token": "x"}, "token_file"),
        ({"stow_url": "https://pacs/studies", "ae_title": "PACS", "port": 104}, "ae_title, port"),
    ]
    for bad, match in bad_entries:
        with pytest.raises(ConfigurationError, match=match) as raised:
            Destination.from_dict(bad)
        assert "pw" not in str(raised.value)
    assert public_url("https://u:p@pacs:8443/dicom-web/studies?x=1#f") == (
        "https://pacs:8443/dicom-web/studies"
    )


# --- against a real Orthanc with the DICOMweb plugin --------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return analysed_source(tmp_path_factory.mktemp("study"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    with orthanc_server(tmp_path / "orthanc", dicomweb=True) as peer:
        yield peer


def _queue(sessions: Any, config: ExportConfig, source: Source) -> int:
    (export_id,) = export.export_results(
        sessions, config, analysis=source.analysis, dwi=source.dwi, datasets=source.datasets
    )
    return export_id


def test_objects_arrive_in_the_source_study_by_stow(
    home: Path, orthanc: OrthancPeer, source: Source
) -> None:
    require_tool("storescu")
    orthanc.store(source.files)
    sessions = node_sessions()
    dest = Destination.from_dict({"name": "web", "stow_url": orthanc.dicomweb + "/studies"})
    config = export_config(home, dest)
    export_id = _queue(sessions, config, source)
    assert export.run_due(sessions, config.destinations, config.policy) == [
        (export_id, ExportState.DONE)
    ]
    (study_id,) = orthanc.get("/studies")
    study = orthanc.get(f"/studies/{study_id}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == source.study_uid
    series = [orthanc.get(f"/series/{s}") for s in study["Series"]]
    (row,) = export_rows(sessions)
    sent = [pydicom.dcmread(p, stop_before_pixels=True) for p in row.file_paths()]
    assert sent[0].Modality == "SR" and sent[-1].Modality == "KO"
    got = sorted(
        (s["MainDicomTags"]["SeriesInstanceUID"], s["MainDicomTags"]["Modality"]) for s in series
    )
    expected = [(source.series_uid, "MR")] + [(ds.SeriesInstanceUID, ds.Modality) for ds in sent]
    assert got == sorted(expected)  # the source series, and each object in a series of its own
    assert len(orthanc.get("/instances")) == len(source.files) + len(sent) == len(source.files) + 6


def test_refusing_endpoint_retries_dead_then_retry_sends_each_object_once(
    home: Path, orthanc: OrthancPeer, source: Source, capsys: pytest.CaptureFixture[str]
) -> None:
    from her2low.cli import main

    sessions = node_sessions()
    wrong = Destination.from_dict({"name": "web", "stow_url": orthanc.dicomweb + "/nope"})
    config = export_config(home, wrong, max_attempts=3, backoff_seconds=0.2)
    export_id = _queue(sessions, config, source)
    states = states_until_dead(sessions, config)
    assert states == [ExportState.PENDING, ExportState.PENDING, ExportState.DEAD]
    (row,) = export_rows(sessions)
    assert row.attempts == 3
    assert row.last_error.startswith("rejected: HTTP 404 Not Found"), row.last_error
    assert orthanc.get("/instances") == []
    assert export.run_due(sessions, config.destinations, config.policy) == []

    assert main(["export", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["counts"]["dead"] == 1 and listed["exports"][0]["id"] == export_id

    fixed = Destination.from_dict({"name": "web", "stow_url": orthanc.dicomweb + "/studies"})
    assert main(["export", "retry", "--all"]) == 0
    assert export.run_due(sessions, (fixed,), config.policy) == [(export_id, ExportState.DONE)]
    # re-sending a delivered batch stores the same SOP Instance UIDs again: still one copy each
    assert main(["export", "retry", str(export_id)]) == 0
    assert export.run_due(sessions, (fixed,), config.policy) == [(export_id, ExportState.DONE)]
    (row,) = export_rows(sessions)
    uids = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in row.file_paths()
    ]
    assert len(uids) == 6
    assert all(len(orthanc.find_instance(uid)) == 1 for uid in uids)
    assert len(orthanc.get("/instances")) == 6


def test_nothing_listening_is_unreachable_and_retried_later(home: Path, source: Source) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    sessions = node_sessions()
    dest = Destination.from_dict({"name": "web", "stow_url": f"http://127.0.0.1:{port}/studies"})
    policy = ExportPolicy(calling_aet="HER2LOW", timeout=2.0, backoff_seconds=60)
    (export_id,) = export.schedule(
        sessions,
        destinations=[dest],
        paths=source.files[:1],
        batch_key="k",
        study_uid=source.study_uid,
        source_series_uid=source.series_uid,
        calling_aet="",
    )
    assert export.run_due(sessions, [dest], policy) == [(export_id, ExportState.PENDING)]
    (row,) = export_rows(sessions)
    assert row.last_error == f"unreachable: no connection to http://127.0.0.1:{port}/studies"
    assert row.next_attempt_at > time.time() + 50


def test_a_real_409_names_each_instance_and_reason(orthanc: OrthancPeer, source: Source) -> None:
    """Orthanc refuses instances of another study than the URL's with 409 and 0x0110."""
    result = stow_files(source.files[:2], url=orthanc.dicomweb + "/studies/1.2.3")
    assert result.outcome is SendOutcome.FAILED and result.stored == []
    assert result.message.startswith("HTTP 409 Conflict: 2 of 2 instance(s) not stored")
    for ds in source.datasets[:2]:
        assert f"{ds.SOPInstanceUID}: Failure 0x0110 Processing Failure" in result.message
    assert str(source.datasets[0].PatientName) not in result.message
    assert str(source.datasets[0].PatientID) not in result.message


def test_bearer_token_from_a_file_and_never_in_the_error_or_logs(
    home: Path, tmp_path: Path, source: Source, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "orthanc-token"
    folder.mkdir()
    (folder / "token.lua").write_text(TOKEN_LUA % TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token\n")
    token_file.chmod(0o600)
    with orthanc_server(
        folder, dicomweb=True, config={"LuaScripts": [str(folder / "token.lua")]}
    ) as peer:
        sessions = node_sessions()
        entry = {
            "name": "web",
            "stow_url": peer.dicomweb + "/studies",
            "token_file": str(token_file),
        }
        dest = Destination.from_dict(entry)
        policy = ExportPolicy(calling_aet="HER2LOW", timeout=5, backoff_seconds=0.1)
        export_id = _queue(sessions, export_config(home, dest), source)
        with caplog.at_level(logging.DEBUG):
            assert export.run_due(sessions, [dest], policy) == [(export_id, ExportState.PENDING)]
        (row,) = export_rows(sessions)
        assert row.last_error.startswith("rejected: HTTP 403 Forbidden")
        assert peer.get("/instances") == []

        token_file.write_text(TOKEN + "\n")  # the token is read at each send: rotation works
        time.sleep(0.2)
        with caplog.at_level(logging.DEBUG):
            assert export.run_due(sessions, [dest], policy) == [(export_id, ExportState.DONE)]
        assert len(peer.get("/instances")) == 6
        token_file.unlink()
        assert main_retry(export_id) == 0
        result = export.run_due(sessions, [dest], policy)
        assert result == [(export_id, ExportState.PENDING)]
        (row,) = export_rows(sessions)
        assert row.last_error.startswith(f"failed: bearer token file {token_file}")
    for text in [row.last_error, caplog.text, json.dumps(entry)]:
        assert TOKEN not in text


def main_retry(export_id: int) -> int:
    from her2low.cli import main

    return main(["export", "retry", str(export_id)])


def _test_pki(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1: (CA, certificate, key) PEM files."""
    pki = server_pki("her2low STOW test CA")
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    for path, pem in zip(paths, (pki.ca, pki.cert, pki.key), strict=True):
        path.write_bytes(pem)
    return paths


def test_https_endpoint_is_verified_against_tls_ca(
    tmp_path: Path, orthanc: OrthancPeer, source: Source
) -> None:
    """Orthanc's DICOMweb behind an nginx TLS front, as a PACS often sits."""
    from tests.test_nginx_front import running_nginx

    ca, cert, key = _test_pki(tmp_path / "pki")
    port = free_port()
    site = f"""
server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 200m;
    location / {{ proxy_pass {orthanc.http}; }}
}}
"""
    with running_nginx(tmp_path / "nginx", site, port):
        url = f"https://127.0.0.1:{port}/dicom-web/studies"
        policy = ExportPolicy(calling_aet="HER2LOW", timeout=5)
        # without the site's CA the system store does not know the certificate: nothing sent
        untrusted = export.send(Destination.from_dict({"stow_url": url}), source.files[:2], policy)
        assert untrusted.outcome is SendOutcome.UNREACHABLE
        assert untrusted.message == f"TLS failed with {url}"
        assert orthanc.get("/instances") == []
        trusted = export.send(
            Destination.from_dict({"stow_url": url, "tls_ca": str(ca)}), source.files[:2], policy
        )
        assert trusted.outcome is SendOutcome.SUCCESS, trusted.message
        assert sorted(trusted.stored) == sorted(str(d.SOPInstanceUID) for d in source.datasets[:2])
        assert len(orthanc.get("/instances")) == 2


def test_front_requiring_a_client_certificate_gets_the_node_certificate(
    home: Path, tmp_path: Path, orthanc: OrthancPeer, source: Source
) -> None:
    """Mutual TLS: nginx takes only clients with a certificate of its CA. The node presents
    ``HER2LOW_NODE_TLS_CERT``/``_KEY``; without it (or with one of another CA) nginx answers
    400, a ``failed`` send that is retried ``node_export_max_attempts`` times, then dead."""
    from tests.test_nginx_front import running_nginx

    pki, stranger = server_pki("her2low STOW mTLS CA"), server_pki("another CA")
    folder = tmp_path / "pki"
    folder.mkdir()
    pems = {
        "ca.pem": pki.ca,
        "server.pem": pki.cert,
        "server.key": pki.key,
        "node.pem": pki.client_cert,
        "node.key": pki.client_key,
        "stranger.pem": stranger.client_cert,
        "stranger.key": stranger.client_key,
    }
    for name, pem in pems.items():
        (folder / name).write_bytes(pem)
        (folder / name).chmod(0o600)
    port = free_port()
    site = f"""
server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {folder / "server.pem"};
    ssl_certificate_key {folder / "server.key"};
    ssl_client_certificate {folder / "ca.pem"};
    ssl_verify_client on;
    client_max_body_size 200m;
    location / {{ proxy_pass {orthanc.http}; }}
}}
"""
    with running_nginx(tmp_path / "nginx", site, port):
        url = f"https://127.0.0.1:{port}/dicom-web/studies"
        dest = Destination.from_dict(
            {"name": "web", "stow_url": url, "tls_ca": str(folder / "ca.pem")}
        )
        # nginx's 400 pages are recognised by their phrases and answered with what to do; the
        # page itself is never copied into the error
        refused = (
            "HTTP 400 Bad Request: the front did not accept the client certificate sent (not "
            f"issued by a CA it trusts, or expired): check this destination's tls_cert ({url})"
        )
        uncertified = (
            "HTTP 400 Bad Request: the front wants a client certificate and got none: give this "
            "destination tls_cert and tls_key (or set HER2LOW_NODE_TLS_CERT and "
            f"HER2LOW_NODE_TLS_KEY) ({url})"
        )
        foreign = ExportPolicy(
            calling_aet="HER2LOW",
            timeout=5,
            tls_cert=folder / "stranger.pem",
            tls_key=folder / "stranger.key",
        )
        result = export.send(dest, source.files[:1], foreign)
        assert (result.outcome, result.message) == (SendOutcome.FAILED, refused)
        # what nginx says in its page (the node does not copy response bodies into errors)
        ca = str(folder / "ca.pem")
        bare = requests.get(url, verify=ca, timeout=5)
        assert bare.status_code == 400 and "No required SSL certificate was sent" in bare.text
        pair = (str(folder / "stranger.pem"), str(folder / "stranger.key"))
        other = requests.get(url, verify=ca, cert=pair, timeout=5)
        assert other.status_code == 400 and "The SSL certificate error" in other.text

        sessions = node_sessions()
        config = export_config(home, dest, max_attempts=2, backoff_seconds=0.1)
        export_id = _queue(sessions, config, source)
        states = states_until_dead(sessions, config)
        assert states == [ExportState.PENDING, ExportState.DEAD]  # bounded, not forever
        (row,) = export_rows(sessions)
        assert row.last_error == f"failed: {uncertified}"
        assert orthanc.get("/instances") == []

        mutual = ExportPolicy(
            calling_aet="HER2LOW",
            timeout=5,
            tls_cert=folder / "node.pem",
            tls_key=folder / "node.key",
        )
        assert main_retry(export_id) == 0
        assert export.run_due(sessions, [dest], mutual) == [(export_id, ExportState.DONE)]
        assert len(orthanc.get("/instances")) == 6

        # the destination's own certificate, with no node-wide one (no DICOM TLS on the node)
        own = Destination.from_dict(
            {
                "name": "web",
                "stow_url": url,
                "tls_ca": str(folder / "ca.pem"),
                "tls_cert": str(folder / "node.pem"),
                "tls_key": str(folder / "node.key"),
            }
        )
        plain = ExportPolicy(calling_aet="HER2LOW", timeout=5)
        assert export.send(own, source.files[:1], plain).outcome is SendOutcome.SUCCESS
        assert export.send(dest, source.files[:1], plain).message == uncertified
        # and it wins over the node's: a foreign node certificate does not matter here
        assert export.send(own, source.files[:1], foreign).outcome is SendOutcome.SUCCESS


def test_a_client_certificate_needs_both_halves() -> None:
    with pytest.raises(ConfigurationError, match="both tls_cert and tls_key"):
        Destination.from_dict({"stow_url": "https://pacs/dicom-web/studies", "tls_cert": "a.pem"})
    with pytest.raises(ConfigurationError, match="both tls_cert and tls_key"):
        Destination.from_dict({"ae_title": "PACS", "host": "h", "port": 104, "tls_key": "k.pem"})
    both = Destination.from_dict(
        {"ae_title": "PACS", "host": "h", "port": 104, "tls_cert": "c.pem", "tls_key": "k.pem"}
    )
    assert both.client_cert(ExportPolicy(calling_aet="HER2LOW", timeout=5)) == (
        Path("c.pem"),
        Path("k.pem"),
    )
