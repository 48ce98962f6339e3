"""A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, for TLS fronts
the tests start (the client certificate for fronts that require one: mutual TLS)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerPki:
    """PEM bytes: the CA a client verifies against, the server's certificate and its key, and a
    client certificate (for mutual TLS) and its key, signed by the same CA."""

    ca: bytes
    cert: bytes
    key: bytes
    client_cert: bytes
    client_key: bytes


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def valid_for_a_day(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    """What every test certificate shares: names, public key, a random serial, valid one day."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def server_pki(ca_name: str) -> ServerPki:
    """A CA named ``ca_name`` (valid one day), a certificate for 127.0.0.1 and localhost, and a
    client certificate (CN ``her2low-node``, extended key usage clientAuth)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        valid_for_a_day(_name(ca_name), _name(ca_name), ca_key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        valid_for_a_day(_name("127.0.0.1"), ca.subject, key, now)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        valid_for_a_day(_name("her2low-node"), ca.subject, client_key, now)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ServerPki(
        ca=ca.public_bytes(serialization.Encoding.PEM),
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=_pem_key(key),
        client_cert=client.public_bytes(serialization.Encoding.PEM),
        client_key=_pem_key(client_key),
    )
