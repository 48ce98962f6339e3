"""TLS on the DICOM port (PS3.15 B.9) with DCMTK as the peer and a throwaway CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db import Instance
from dicom_node.receiving.tls import context_from_settings
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import ConfigurationError, load_settings
from tests.conftest import require_tool
from tests.node_data import mr_dataset, write
from tests.test_node_security import running_scp

_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    cn: str, ca_key: rsa.RSAPrivateKey, ca: x509.Certificate, *, server: bool
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("her2low test CA")
    server_key, server = _leaf("her2low-node", ca_key, ca, server=True)
    client_key, client = _leaf("PACS", ca_key, ca, server=False)
    rogue_ca_key, rogue_ca = _ca("rogue CA")
    rogue_key, rogue = _leaf("PACS", rogue_ca_key, rogue_ca, server=False)
    return Pki(
        ca=_write_cert(ca, folder / "ca.pem"),
        server_cert=_write_cert(server, folder / "server.pem"),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=_write_cert(client, folder / "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
        rogue_cert=_write_cert(rogue, folder / "rogue.pem"),
        rogue_key=_write_key(rogue_key, folder / "rogue.key"),
    )


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool(args[0])
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=_ENV)


def _echo_tls(port: int, pki: Pki, *tls: str) -> subprocess.CompletedProcess[str]:
    return _dcmtk("echoscu", "-aet", "PACS", "-aec", "HER2LOW", *tls, "127.0.0.1", str(port))


def _with_cert(pki: Pki) -> tuple[str, ...]:
    return ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))


def _without_cert(pki: Pki) -> tuple[str, ...]:
    return ("+tla", "+cf", str(pki.ca))


# --------------------------------------------------------------------------- configuration


def test_tls_is_off_without_a_certificate(home: Path) -> None:
    assert context_from_settings(load_settings()) is None


@pytest.mark.parametrize("missing", ["node_tls_key", "node_tls_cert"])
def test_cert_and_key_go_together(home: Path, pki: Pki, missing: str) -> None:
    given = {"node_tls_cert": pki.server_cert, "node_tls_key": pki.server_key}
    del given[missing]
    with pytest.raises(ConfigurationError, match="HER2LOW_NODE_TLS_CERT"):
        context_from_settings(load_settings(**given))


def test_ca_without_certificate_is_a_configuration_error(home: Path, pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="HER2LOW_NODE_TLS_CA"):
        context_from_settings(load_settings(node_tls_ca=pki.ca))


def test_unreadable_key_is_a_configuration_error(home: Path, pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ConfigurationError, match="HER2LOW_NODE_TLS_KEY"):
        context_from_settings(load_settings(node_tls_cert=pki.server_cert, node_tls_key=bad))


def test_mutual_tls_requires_client_certificates(home: Path, pki: Pki) -> None:
    import ssl

    context = context_from_settings(
        load_settings(
            node_tls_cert=pki.server_cert, node_tls_key=pki.server_key, node_tls_ca=pki.ca
        )
    )
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


# --------------------------------------------------------------------------- DCMTK over TLS


@pytest.mark.integration
def test_server_tls_accepts_clients_with_and_without_certificates(home: Path, pki: Pki) -> None:
    with running_scp(home, node_tls_cert=pki.server_cert, node_tls_key=pki.server_key) as port:
        with_cert = _echo_tls(port, pki, *_with_cert(pki))
        assert with_cert.returncode == 0, with_cert.stderr
        anonymous = _echo_tls(port, pki, *_without_cert(pki))
        assert anonymous.returncode == 0, anonymous.stderr
        plain = _echo_tls(port, pki)
        assert plain.returncode != 0  # plain TCP to a TLS port


@pytest.mark.integration
def test_mutual_tls_end_to_end(home: Path, pki: Pki, tmp_path: Path) -> None:
    settings = {
        "node_tls_cert": pki.server_cert,
        "node_tls_key": pki.server_key,
        "node_tls_ca": pki.ca,
        "node_acse_timeout": 5.0,
    }
    with running_scp(home, **settings) as port:
        # a silent plain-TCP peer holding a connection must not stall the listener
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            ok = _echo_tls(port, pki, *_with_cert(pki))
            assert ok.returncode == 0, ok.stderr

        no_cert = _echo_tls(port, pki, *_without_cert(pki))
        assert no_cert.returncode != 0, "a client without a certificate got in"
        plain = _echo_tls(port, pki)
        assert plain.returncode != 0, "plain TCP got in"
        rogue = _echo_tls(
            port, pki, "+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)
        )
        assert rogue.returncode != 0, "a certificate from another CA got in"

        path = write(mr_dataset(generate_uid(), generate_uid()), tmp_path / "mr.dcm")
        sent = _dcmtk(
            "storescu", "-aet", "PACS", "-aec", "HER2LOW", *_with_cert(pki),
            "127.0.0.1", str(port), str(path),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert _echo_tls(port, pki, *_with_cert(pki)).returncode == 0  # still serving

    node = load_settings()
    with session_factory(make_engine(node.node_database_url))() as session:
        (row,) = session.scalars(select(Instance)).all()
    assert row.calling_aet == "PACS"
    stored, original = pydicom.dcmread(row.path), pydicom.dcmread(path)
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.PixelData == original.PixelData


def test_export_presents_the_destination_certificate_to_a_pacs_requiring_one(
    pki: Pki, tmp_path: Path
) -> None:
    """Results by C-STORE over TLS to DCMTK ``storescp --require-peer-cert``: the destination's
    own ``tls_cert``/``tls_key`` get in without any node-wide certificate; none does not."""
    from dicom_node.jobs import export
    from dicom_node.jobs.export import Destination, ExportPolicy
    from dicom_node.jobs.export_scu import SendOutcome
    from her2low.core.ports import free_port, wait_port

    require_tool("storescp")
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    server = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+tls", str(pki.server_key), str(pki.server_cert),
         "+cf", str(pki.ca), "--require-peer-cert", "-od", str(out), str(port)],
        env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_port(port), "storescp did not listen"
        path = write(mr_dataset(generate_uid(), generate_uid()), tmp_path / "mr.dcm")
        entry: dict[str, object] = {
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": port,
            "tls": True,
        }
        entry["tls_ca"] = str(pki.ca)
        policy = ExportPolicy(calling_aet="HER2LOW", timeout=10)
        refused = export.send(Destination.from_dict(entry), [path], policy)
        assert refused.outcome is not SendOutcome.SUCCESS
        assert list(out.iterdir()) == []
        entry |= {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
        sent = export.send(Destination.from_dict(entry), [path], policy)
        assert sent.outcome is SendOutcome.SUCCESS, sent.message
        (stored,) = out.iterdir()
        assert pydicom.dcmread(stored).SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID
    finally:
        server.terminate()
        server.wait(timeout=10)
