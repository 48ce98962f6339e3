"""Association acceptance: AE-title and host allow-list, called AE, limits and timeouts.

Rejections are checked twice: as DCMTK prints them and as the numeric A-ASSOCIATE-RJ fields
(PS3.8 Table 9-21) a pynetdicom requestor receives.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.receiving import scp
from dicom_node.receiving.access import (
    AccessPolicy,
    AllowEntry,
    RejectReason,
    RejectResult,
    RejectSource,
)
from her2low.core.settings import ConfigurationError, load_settings
from tests.conftest import require_tool
from tests.node_scp import running_scp

_ENV = {**os.environ, "TCP_NODELAY": "1"}
VERIFICATION = "1.2.840.10008.1.1"


def _fake_resolver(name: str) -> list[str]:
    return {"pacs.example.test": ["192.0.2.10", "2001:db8::10"]}.get(name, [])


# --------------------------------------------------------------------------- the policy itself


@pytest.mark.parametrize(
    ("entry", "calling", "address", "admitted"),
    [
        ("ORTHANC", "ORTHANC", "203.0.113.7", True),
        ("ORTHANC", "OTHER", "203.0.113.7", False),
        ("ORTHANC@192.0.2.10", "ORTHANC", "192.0.2.10", True),
        ("ORTHANC@192.0.2.10", "ORTHANC", "192.0.2.11", False),
        ("ORTHANC@192.0.2.0/24", "ORTHANC", "192.0.2.200", True),
        ("ORTHANC@192.0.2.0/24", "ORTHANC", "192.0.3.1", False),
        ("ORTHANC@192.0.2.0/24", "ORTHANC", "::ffff:192.0.2.9", True),  # dual-stack socket
        ("ORTHANC@2001:db8::/32", "ORTHANC", "2001:db8::1", True),
        ("ORTHANC@pacs.example.test", "ORTHANC", "192.0.2.10", True),
        ("ORTHANC@pacs.example.test", "ORTHANC", "2001:db8::10", True),
        ("ORTHANC@pacs.example.test", "ORTHANC", "192.0.2.11", False),
        ("ORTHANC@nowhere.example.test", "ORTHANC", "192.0.2.10", False),  # fails closed
        (" ORTHANC @ 192.0.2.10 ", "ORTHANC", "192.0.2.10", True),
        ("ORTHANC", "ORTHANC  ", "192.0.2.10", True),  # AE titles are space padded
        ("ORTHANC@192.0.2.10", "ORTHANC", "not-an-address", False),
    ],
)
def test_allow_entry(entry: str, calling: str, address: str, admitted: bool) -> None:
    assert AllowEntry.parse(entry, _fake_resolver).admits(calling, address) is admitted


@pytest.mark.parametrize(
    "entry", ["", "@192.0.2.1", "WAY_TOO_LONG_AE_TITLE", "BAD\\AE", "ORTHANC@", "A@300.1.1.1/8"]
)
def test_invalid_entries_name_the_setting(entry: str) -> None:
    with pytest.raises(ConfigurationError, match="HER2LOW_NODE_ALLOWED_CALLING_AETS"):
        AllowEntry.parse(entry, _fake_resolver)


def test_policy_checks_called_ae_before_calling_ae() -> None:
    policy = AccessPolicy.from_entries("HER2LOW", ["ORTHANC@192.0.2.10"], _fake_resolver)
    assert policy.check("ORTHANC", "HER2LOW", "192.0.2.10") is None
    assert policy.check("ORTHANC", "HER2LOW", "192.0.2.99") is (
        RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    )
    assert policy.check("STRANGER", "NOTUS", "192.0.2.10") is (
        RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
    )
    open_policy = AccessPolicy.from_entries("HER2LOW", [])
    assert open_policy.check("ANYONE", "HER2LOW", "198.51.100.1") is None
    assert int(RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED) == 3
    assert int(RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED) == 7


def test_bad_allow_list_stops_the_scp_from_starting(home: Path) -> None:
    settings = load_settings(node_allowed_calling_aets=["OK", "@nohost"])
    with pytest.raises(ConfigurationError):
        scp.build_ae(settings)


# --------------------------------------------------------------------------- over the network


def _echoscu(
    port: int, calling: str = "PEER", called: str = "HER2LOW"
) -> subprocess.CompletedProcess[str]:
    require_tool("echoscu")
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_ENV,
    )


def _associate(port: int, calling: str = "PEER", called: str = "HER2LOW") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "association was not rejected"
    rsp = assoc.acceptor.primitive
    assert rsp is not None
    return (int(rsp.result), int(rsp.result_source), int(rsp.diagnostic))  # type: ignore[arg-type]


@pytest.mark.integration
def test_known_ae_from_the_wrong_host_is_refused_with_reason_3(home: Path) -> None:
    with running_scp(home, node_allowed_calling_aets=["PEER@192.0.2.1", "OTHER"]) as port:
        refused = _echoscu(port, "PEER")
        assert refused.returncode != 0
        assert "Rejected Permanent" in refused.stderr
        assert "Service User" in refused.stderr
        assert "Calling AE Title Not Recognized" in refused.stderr
        assoc = _associate(port, "PEER")
        assert _rejection(assoc) == (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED,
        )
        assert _echoscu(port, "OTHER").returncode == 0  # any host
        assert _echoscu(port, "STRANGER").returncode != 0


@pytest.mark.integration
@pytest.mark.parametrize("where", ["127.0.0.1", "127.0.0.0/8", "localhost"])
def test_known_ae_from_its_host_is_accepted(home: Path, where: str) -> None:
    with running_scp(home, node_allowed_calling_aets=[f"PEER@{where}"]) as port:
        result = _echoscu(port, "PEER")
        assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_wrong_called_ae_is_refused_with_reason_7(home: Path) -> None:
    with running_scp(home) as port:
        assoc = _associate(port, "PEER", called="NOTUS")
        assert _rejection(assoc) == (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED,
        )
        assert _echoscu(port, "PEER").returncode == 0


@pytest.mark.integration
def test_associations_beyond_the_limit_are_refused_transiently(home: Path) -> None:
    with running_scp(home, node_max_associations=2) as port:
        held = [_associate(port, f"HOLD{i}") for i in range(2)]
        try:
            assert all(a.is_established for a in held)
            refused = _echoscu(port, "PEER")
            assert refused.returncode != 0
            assert "Rejected Transient" in refused.stderr
            assert "Local Limit Exceeded" in refused.stderr
            # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), reason 2
            assert _rejection(_associate(port, "PEER")) == (2, 3, 2)
        finally:
            for assoc in held:
                assoc.release()
        deadline = time.monotonic() + 10
        while _echoscu(port, "PEER").returncode != 0:  # freed slots are usable again
            assert time.monotonic() < deadline, "association slots not freed"
            time.sleep(0.2)


@pytest.mark.integration
def test_silent_connection_is_dropped_after_the_acse_timeout(home: Path) -> None:
    with running_scp(home, node_acse_timeout=1.0) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as silent:
            started = time.monotonic()
            assert silent.recv(1024) == b""  # closed by the node, no A-ASSOCIATE-RQ seen
            assert time.monotonic() - started < 10
        assert _echoscu(port).returncode == 0


@pytest.mark.integration
def test_idle_association_is_aborted_after_the_network_timeout(home: Path) -> None:
    with running_scp(home, node_network_timeout=1.0) as port:
        assoc = _associate(port)
        assert assoc.is_established
        deadline = time.monotonic() + 15
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established and assoc.is_aborted
        assert _echoscu(port).returncode == 0
