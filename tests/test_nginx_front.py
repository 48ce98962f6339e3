"""deploy/nginx/her2low.conf in front of the real service (``her2low service``, gunicorn).

40 slow clients each trickle a hook request body (one byte every 0.2 s, loopback only, for a
bounded time). Straight to gunicorn they hold its threads and ``/healthz`` stalls (checked too,
so the slow clients are known to be a real load); through nginx, which reads each body whole
before passing it on, ``/healthz`` and signed hook calls keep a p99 of at most 100 ms.

The service runs one gunicorn worker (4 threads), so the check without nginx is certain. With
two, the kernel may hand most slow clients to one worker while the other keeps answering; that
made the check fail one fresh-clone ``make test`` run. The test runs the shipped file, changing
only ports, certificate paths and the upstream address; nginx and gunicorn are stopped in a
``finally``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import math
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port, require_tool
from tests.server_pki import valid_for_a_day
from tests.system import System, popen_group, running_system, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "her2low.conf"
SERVICE_PATH = "/cds-services/her2low-mri"
SLOW_CLIENTS = 40
P99_LIMIT = 0.100


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the client trusts exactly this certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        valid_for_a_day(name, name, key, now)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cds.crt", folder / "cds.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def site_config(https_port: int, http_port: int, upstream_port: int, cert: Path, key: Path) -> str:
    """The shipped server blocks with this run's ports and certificate: nothing else changes."""
    text = SITE.read_text()
    swaps = {
        "server 127.0.0.1:8080": f"server 127.0.0.1:{upstream_port}",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "/etc/her2low/tls/cds.crt": str(cert),
        "/etc/her2low/tls/cds.key": str(key),
    }
    for old, new in swaps.items():
        assert old in text, f"{SITE.name} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def nginx_main_config(prefix: Path, site: Path) -> str:
    """A whole nginx.conf under ``prefix`` (pid, logs, temp folders) including the site file."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temps = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in kinds)
    user = "user root;\n" if os.geteuid() == 0 else ""  # temp folders are private to us
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n    access_log off;\n"
        f"{temps}\n    include {site};\n}}\n"
    )


@contextmanager
def running_nginx(prefix: Path, site_text: str, https_port: int) -> Iterator[None]:
    nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else require_tool("nginx")
    prefix.mkdir()
    site = prefix / "her2low.conf"
    site.write_text(site_text)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_config(prefix, site))
    checked = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    with open(prefix / "nginx.out", "wb") as out:
        proc = popen_group(
            [nginx, "-p", str(prefix), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", https_port), timeout=1),
            ):
                break
            assert proc.poll() is None, (prefix / "error.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "nginx did not listen in 20 s"
            time.sleep(0.1)
        yield
    finally:
        stop_group(proc, timeout=10)


def slow_client(
    port: int,
    tls: ssl.SSLContext | None,
    token: str,
    stop: threading.Event,
    opened: list[bool],
) -> None:
    """Send a hook call's headers, then its body one byte every 0.2 s until ``stop``."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        opened.append(False)
        return
    sock: socket.socket = raw
    try:
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(
            (
                f"POST {SERVICE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                "Content-Length: 65536\r\n\r\n"
            ).encode()
        )
        opened.append(True)
        while not stop.wait(0.2):
            sock.sendall(b" ")
    except OSError:
        opened.append(False)
    finally:
        with contextlib.suppress(OSError):
            sock.close()


@contextmanager
def trickling(port: int, tls: ssl.SSLContext | None, token: Callable[[], str]) -> Iterator[None]:
    """``SLOW_CLIENTS`` slow clients for the duration of the block (threads joined after)."""
    stop = threading.Event()
    opened: list[bool] = []
    threads = [
        threading.Thread(target=slow_client, args=(port, tls, token(), stop, opened), daemon=True)
        for _ in range(SLOW_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 15
        while len(opened) < SLOW_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the bodies are under way
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def hook_body() -> dict[str, object]:
    return {
        "hook": "patient-view",
        "hookInstance": "5a5d8c1e-7b0e-4c55-9d0e-1f0f2b6c3a11",
        "context": {"userId": "Practitioner/doc-1", "patientId": "pat-1"},
        "prefetch": {
            "patient": {
                "resourceType": "Patient",
                "id": "pat-1",
                "identifier": [{"system": "urn:her2low:demo:mrn", "value": "MRN-1"}],
            },
            "her2": None,
        },
    }


def measure(
    session: requests.Session, base: str, system: System, audience: str, rounds: int
) -> tuple[list[float], list[float]]:
    """Latencies of ``/healthz`` and of signed hook calls (seconds), one after the other."""
    health: list[float] = []
    hooks: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        answer = session.get(f"{base}/healthz", timeout=5)
        health.append(time.perf_counter() - start)
        assert answer.status_code == 200, answer.text
        token = system.token(audience)
        start = time.perf_counter()
        answer = session.post(
            f"{base}{SERVICE_PATH}",
            json=hook_body(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        hooks.append(time.perf_counter() - start)
        assert answer.status_code == 200, answer.text
        assert "cards" in answer.json()
    return health, hooks


def starved_health(base: str, tries: int = 3, timeout: float = 2.0) -> list[float | None]:
    """``/healthz`` straight to gunicorn: seconds per try, None when it timed out."""
    seen: list[float | None] = []
    for _ in range(tries):
        start = time.perf_counter()
        try:
            requests.get(f"{base}/healthz", timeout=timeout)
            seen.append(time.perf_counter() - start)
        except requests.RequestException:
            seen.append(None)
    return seen


def wait_healthy(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer 200 in {timeout:.0f} s")


def test_nginx_front_keeps_healthz_and_hooks_fast_under_40_slow_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cds_port, https_port, http_port = free_port(), free_port(), free_port()
    public = f"https://127.0.0.1:{https_port}"
    audience = f"{public}{SERVICE_PATH}"
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cert, key = self_signed(tls_dir)
    client_tls = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # requests trusts exactly our cert
    site = site_config(https_port, http_port, cds_port, cert, key)
    # nginx first (it answers 502 until the service is up), then the service, awaited on its
    # own port.
    with (
        running_nginx(tmp_path / "nginx", site, https_port),
        running_system(
            tmp_path,
            components=(),
            HER2LOW_CDS_PORT=str(cds_port),
            HER2LOW_CDS_PUBLIC_BASE_URL=public,
        ) as system,
    ):
        system.start("service", "--workers", "1")  # one worker: see the module docstring
        direct = f"http://127.0.0.1:{cds_port}"
        wait_healthy(f"{direct}/healthz")
        with requests.Session() as session:
            session.verify = str(cert)
            plain = session.get(
                f"http://127.0.0.1:{http_port}/healthz", allow_redirects=False, timeout=5
            )
            assert plain.status_code == 301  # plain HTTP is sent to HTTPS
            measure(session, public, system, audience, rounds=3)  # warm: TLS, keep-alive, model

            # Without the front: the same slow clients straight to gunicorn.
            with trickling(cds_port, None, lambda: system.token(audience)):
                starved = starved_health(direct)
            wait_healthy(f"{direct}/healthz", timeout=60)  # recovered once they left

            with trickling(https_port, client_tls, lambda: system.token(audience)):
                health, hooks = measure(session, public, system, audience, rounds=60)
        report = (
            f"through nginx: /healthz p99 {p99(health) * 1000:.1f} ms, hook p99 "
            f"{p99(hooks) * 1000:.1f} ms ({len(health)} each); straight to gunicorn /healthz "
            f"took {[None if s is None else round(s, 3) for s in starved]} s (None = >2 s)"
        )
        print(report)
        # The slow clients must hurt gunicorn alone, or this test would prove nothing about nginx.
        assert None in starved, "the slow clients no longer stall gunicorn: " + report
        assert p99(health) <= P99_LIMIT, report
        assert p99(hooks) <= P99_LIMIT, report
