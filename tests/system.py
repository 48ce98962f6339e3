"""A whole her2low system (node, worker, service) as real processes, for integration tests."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.conftest import free_port

ISSUER = "https://ehr.example.test"


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM when the test process dies (Linux
    ``PR_SET_PDEATHSIG``), so even a killed test run leaves no node or service behind."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


def popen_group(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process in its own process group (it and its children, e.g. gunicorn's workers,
    can be stopped together by :func:`stop_group`)."""
    return subprocess.Popen(
        list(args), start_new_session=True, preexec_fn=_die_with_parent(), **kwargs
    )


def stop_group(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 30
) -> int | None:
    """Send ``sig`` to the process, wait, then SIGKILL whatever is left of its process group.

    Returns the process's exit code after ``sig`` (None when it had to be killed)."""
    code: int | None = None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(timeout=timeout)
    else:
        code = proc.returncode
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader: children too
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return code


def group_alive(pgid: int) -> bool:
    """True while any process of the process group ``pgid`` still runs (zombies excepted)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class System:
    def __init__(self, home: Path, env: dict[str, str], key: ec.EllipticCurvePrivateKey) -> None:
        self.home = home
        self.env = env
        self.key = key
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def base(self) -> str:
        return self.env["HER2LOW_CDS_PUBLIC_BASE_URL"]

    @property
    def node_port(self) -> int:
        return int(self.env["HER2LOW_NODE_PORT"])

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "her2low", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, name: str, *args: str) -> None:
        """Start ``her2low <name> [args]`` (stopped by ``stop_all``), logging to home/<name>.log."""
        with open(self.home / f"{name}.log", "ab") as log:
            self.procs.append(
                popen_group(
                    [sys.executable, "-m", "her2low", name, *args],
                    env=self.env,
                    stdout=log,
                    stderr=log,
                )
            )

    def review_session(self, role: str = "oncologist") -> requests.Session:
        """A browser-like session signed in to the review app as a new user with ``role``."""
        username, password = f"e2e-{role}", secrets.token_urlsafe(18)
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "her2low",
                "user",
                "add",
                username,
                "--role",
                role,
                "--password-stdin",
            ],
            env=self.env,
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        browser = requests.Session()
        form = browser.get(f"{self.base}/review/sign-in", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert csrf, form
        signed_in = browser.post(
            f"{self.base}/review/sign-in",
            data={"username": username, "password": password, "csrf_token": csrf.group(1)},
            timeout=10,
        )
        assert signed_in.status_code == 200 and "Signed in as" in signed_in.text
        return browser

    def token(self, audience: str, **overrides: object) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": str(uuid.uuid4()),
            **overrides,
        }
        return jwt.encode(claims, self.key, algorithm="ES384", headers={"kid": "k1", "typ": "JWT"})

    def results_token(self) -> str:
        return (self.home / "secrets" / "results-api-token").read_text().strip()

    def stop_all(self) -> None:
        """SIGTERM every process, then SIGKILL each one's whole group (gunicorn workers too)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            stop_group(proc, timeout=10)
        self.procs.clear()

    def wait_result(self, study_uid: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = requests.get(
                    f"{self.base}/api/v1/results",
                    params={"study_instance_uid": study_uid},
                    headers={"Authorization": f"Bearer {self.results_token()}"},
                    timeout=5,
                )
                if r.ok:
                    ready = [x for x in r.json().get("results", []) if x.get("prediction")]
                    if ready:
                        return dict(ready[0])
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError("no result published in time\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.home.glob("*.log")
        )


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise TimeoutError(url)


@contextmanager
def running_system(
    tmp_path: Path, *, components: tuple[str, ...] = ("node", "worker", "service"), **extra_env: str
) -> Iterator[System]:
    home = tmp_path / "home"
    home.mkdir()
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES384", use="sig")
    jwks = tmp_path / "ehr-jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    cds_port = free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_NODE_PORT": str(free_port()),
        "HER2LOW_NODE_HOST": "127.0.0.1",
        "HER2LOW_NODE_METRICS_PORT": str(free_port()),  # side ports: never the fixed defaults
        "HER2LOW_WORKER_METRICS_PORT": "0",
        "HER2LOW_NODE_QUIET_SECONDS": "2",
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_NODE_RESULTS_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: str(jwks)}),
    }
    env.update(extra_env)
    sys_ = System(home, env, key)
    upgraded = sys_.run("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    try:
        for name in components:
            sys_.start(name)
        if "service" in components:
            _wait_http(f"{sys_.base}/cds-services")
        yield sys_
    finally:
        sys_.stop_all()
