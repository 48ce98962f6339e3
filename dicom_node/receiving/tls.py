"""TLS for the DICOM port (PS3.15 Annex B.9, BCP 195 TLS Secure Transport Connection Profile).

TLS 1.2 or later only. With a CA bundle configured, the node requires and verifies a client
certificate (mutual TLS); without one, any client may connect over TLS and the AE-title and host
allow-list (:mod:`dicom_node.receiving.access`) still apply.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from her2low.core.settings import ConfigurationError, Settings


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server-side context; ``ca`` turns on required client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"HER2LOW_NODE_TLS_CERT/HER2LOW_NODE_TLS_KEY: cannot load {cert} with {key}: {exc}"
        ) from exc
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"HER2LOW_NODE_TLS_CA: cannot load {ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def context_from_settings(settings: Settings) -> ssl.SSLContext | None:
    """The node's context, or ``None`` for plain TCP when no certificate is configured."""
    cert, key, ca = settings.node_tls_cert, settings.node_tls_key, settings.node_tls_ca
    if cert is None and key is None:
        if ca is not None:
            raise ConfigurationError(
                "HER2LOW_NODE_TLS_CA needs HER2LOW_NODE_TLS_CERT and HER2LOW_NODE_TLS_KEY"
            )
        return None
    if cert is None or key is None:
        raise ConfigurationError(
            "HER2LOW_NODE_TLS_CERT and HER2LOW_NODE_TLS_KEY must be set together"
        )
    return server_context(cert, key, ca)
