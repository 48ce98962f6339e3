"""``her2low up``: the whole system on embedded defaults, in one terminal.

Migrates both databases, starts node, worker and service as child processes (logs under
``$HER2LOW_HOME/logs``), waits until each answers, loads the synthetic demo study through a real
DICOM association, prints where everything is, and stops everything on Ctrl-C or SIGTERM: the
signal is forwarded to the children, they are waited for, and a requested stop exits 0 (so
``make up`` and a service manager see a clean stop). A port already taken (another ``up``) is
named with its setting before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from her2low import demo_ehr
from her2low.core.settings import Settings

COMPONENTS = ("node", "worker", "service")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_TIMEOUT = 15.0  # seconds the children get to stop before they are killed


class _Stop(BaseException):
    """SIGTERM or SIGINT asked ``up`` to stop (a BaseException, like KeyboardInterrupt, so that
    no ``except Exception`` on the way swallows it)."""


def _bind_host(host: str) -> str:
    return host if host not in ("", "*") else "0.0.0.0"


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound because something listens there already."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind((_bind_host(host), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def listening_ports(settings: Settings) -> list[tuple[str, int, str]]:
    """(host, port, setting) of every port the children listen on."""
    ports = [
        (settings.node_host, settings.node_port, "HER2LOW_NODE_PORT"),
        (settings.cds_host, settings.cds_port, "HER2LOW_CDS_PORT"),
    ]
    if settings.review_port:
        review_host = settings.review_host or settings.cds_host
        ports.append((review_host, settings.review_port, "HER2LOW_REVIEW_PORT"))
    if settings.node_metrics_port:
        ports.append(
            (settings.node_metrics_host, settings.node_metrics_port, "HER2LOW_NODE_METRICS_PORT")
        )
    if settings.worker_metrics_port:
        ports.append(
            (
                settings.node_metrics_host,
                settings.worker_metrics_port,
                "HER2LOW_WORKER_METRICS_PORT",
            )
        )
    return ports


def busy_ports(settings: Settings) -> list[str]:
    """``port N (SETTING) is already in use`` for each configured port something else holds."""
    return [
        f"port {port} ({variable}) is already in use"
        for host, port, variable in listening_ports(settings)
        if port_in_use(host, port)
    ]


def _wait_port(host: str, port: int, timeout: float, child: subprocess.Popen[bytes]) -> bool:
    """Wait until ``host:port`` accepts connections, giving up early if ``child`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "*") else ("::1" if host == "::" else host)


def trusted_issuers(settings: Settings, demo: bool) -> dict[str, Any] | None:
    """The issuers the service should trust: the configured ones, plus the demo EHR's key when
    the demo is on (None: leave the setting as it is)."""
    if not demo:
        return None
    jwks = demo_ehr.ensure_keys(settings.home)
    issuers = dict(settings.cds_trusted_issuers)
    if demo_ehr.ISSUER in issuers:
        return None
    issuers[demo_ehr.ISSUER] = str(jwks.resolve())
    return issuers


def _child_env(settings: Settings, issuers: dict[str, Any] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["HER2LOW_HOME"] = str(settings.home.resolve())
    if issuers is not None:
        env["HER2LOW_CDS_TRUSTED_ISSUERS"] = json.dumps(issuers)
    return env


def upgrade_databases(settings: Settings) -> None:
    """Migrate the node and the service databases to their heads (``her2low db upgrade``)."""
    from cds_service.db import MIGRATIONS as SERVICE_MIGRATIONS
    from dicom_node.db import MIGRATIONS as NODE_MIGRATIONS

    settings.home.mkdir(parents=True, exist_ok=True)
    NODE_MIGRATIONS.upgrade(settings.node_database_url)
    SERVICE_MIGRATIONS.upgrade(settings.cds_database_url)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM if ``up`` dies without stopping it (``kill -9``
    of ``up``): Linux ``PR_SET_PDEATHSIG``; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


class _Signals:
    """SIGTERM/SIGINT handling of ``up``: raise :class:`_Stop` (deferred while a child is being
    started, so no child escapes the list), then, while stopping, kill on a second signal."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.critical = False
        self.pending: int | None = None
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: Ctrl-C still raises KeyboardInterrupt
            self._previous.clear()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:  # a second Ctrl-C: do not wait any longer
            for child in self.children.values():
                if child.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
            return
        if self.critical:
            self.pending = signum
            return
        self.stopping = True
        raise _Stop(signum)

    def spawn(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.critical = True
        try:
            with open(log, "ab") as log_file:
                self.children[name] = subprocess.Popen(
                    args,
                    env=env,
                    stdout=log_file,
                    stderr=log_file,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent(),
                )
        finally:
            self.critical = False
        if self.pending is not None:
            self.stopping = True
            raise _Stop(self.pending)

    def stop_children(self) -> None:
        """SIGTERM to every child still running, wait for all, SIGKILL the ones that hang."""
        self.stopping = True
        alive = [c for c in self.children.values() if c.poll() is None]
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in alive:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _log_tail(path: Path, size: int = 8192) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _why_stopped(name: str, settings: Settings, home: Path) -> str:
    """The cause of a child's death a user can act on, when its log says (a port taken)."""
    tail = _log_tail(home / "logs" / f"{name}.log")
    if any(m in tail for m in ("already in use", "EADDRINUSE", "Connection in use")):
        ports = {"node": listening_ports(settings)[:1], "service": listening_ports(settings)[1:]}
        named = [f"port {p} ({v})" for _, p, v in ports.get(name, [])]
        return f"{' or '.join(named) or 'a port'} is already in use"
    return ""


def _report_dead(names: list[str], settings: Settings, home: Path) -> None:
    for name in names:
        why = _why_stopped(name, settings, home)
        print(
            f"her2low up: error: {name} stopped{': ' + why if why else ''}; see "
            f"{home / 'logs' / (name + '.log')}",
            file=sys.stderr,
        )


def _node_address(settings: Settings) -> str:
    host = settings.node_host
    if host in ("0.0.0.0", "", "::", "*"):
        host = socket.gethostname()
    return f"{settings.node_ae_title}@{host}:{settings.node_port}"


def up(settings: Settings, *, demo: bool = True) -> int:
    """Run node, worker and service until stopped; 0 on a requested stop, 1 when one fails."""
    home = settings.home.resolve()
    busy = busy_ports(settings)
    if busy:
        print(
            f"her2low up: error: {'; '.join(busy)} (is another `her2low up` running? "
            "stop it, or choose other ports)",
            file=sys.stderr,
        )
        return 1
    signals = _Signals()
    signals.install()
    try:
        from her2low.core.private_files import check_private, private_umask

        private_umask()  # home, logs and every child's files: nothing readable by others
        check_private(home)
        (home / "logs").mkdir(parents=True, exist_ok=True)
        upgrade_databases(settings)
        settings.results_token()  # create the shared secret before the children read it
        issuers = trusted_issuers(settings, demo)
        if issuers is not None and settings.cds_trusted_issuers:
            print(
                f"her2low up: WARNING: the demo is on, so the local demo EHR issuer "
                f"{demo_ehr.ISSUER} is trusted BESIDE the configured HER2LOW_CDS_TRUSTED_ISSUERS "
                "(use `her2low up --no-demo` where real EHRs call)",
                file=sys.stderr,
                flush=True,
            )
        env = _child_env(settings, issuers)
        for name in COMPONENTS:
            signals.spawn(
                name, [sys.executable, "-m", "her2low", name], env, home / "logs" / f"{name}.log"
            )
        children = signals.children
        ok = _wait_port(
            _connect_host(settings.cds_host), settings.cds_port, 60, children["service"]
        ) and _wait_port(
            _connect_host(settings.node_host), settings.node_port, 60, children["node"]
        )
        dead = [n for n, c in children.items() if c.poll() is not None]
        if not ok or dead:
            _report_dead(dead, settings, home)
            if not dead:
                print(
                    f"her2low up: error: a component did not start; see {home / 'logs'}",
                    file=sys.stderr,
                )
            return 1
        base = settings.cds_public_base_url.rstrip("/")
        print("her2low is up (reference model, NOT clinically validated)")
        print(f"  DICOM node     {_node_address(settings)}")
        print(f"  CDS discovery  {base}/cds-services")
        print(f"  review app     {base}/review/")
        print(f"  data           {home}")
        print(f"  logs           {home / 'logs'}")
        print("  settings       her2low config --show")
        if demo:
            _load_demo(settings, home, trusted_only_demo=not settings.cds_trusted_issuers)
        print("press Ctrl-C to stop", flush=True)
        while all(c.poll() is None for c in children.values()):
            time.sleep(0.5)
        _report_dead([n for n, c in children.items() if c.poll() is not None], settings, home)
        return 1
    except (_Stop, KeyboardInterrupt):
        signals.stopping = True
        print("her2low up: stopping node, worker and service ...", file=sys.stderr, flush=True)
        return 0
    finally:
        signals.stop_children()
        signals.restore()


def _load_demo(settings: Settings, home: Path, *, trusted_only_demo: bool) -> None:
    """Send the demo study and show its card; a failure is reported, the system stays up."""
    from her2low.demo import demo as run_demo

    if trusted_only_demo:
        print(
            f"  trusting the local demo EHR issuer {demo_ehr.ISSUER} (keys in {home / 'secrets'})"
        )
    _print_demo_users(settings)
    print("loading the synthetic demo study ...", flush=True)
    try:
        code = run_demo(settings, as_json=False, timeout=120)
    except Exception as exc:  # the demo is a courtesy: the system it shows stays up
        print(f"her2low up: the demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    if code != 0:
        print("her2low up: the demo study did not produce a card; see the logs", file=sys.stderr)


def _print_demo_users(settings: Settings) -> None:
    """One review-app account per role with a random password, printed loudly (demo only)."""
    from cds_service.accounts import demo_users_path, setup_demo_users

    users = setup_demo_users(settings)
    print("  !!! DEMO review-app accounts (random passwords; demo only, never on real data) !!!")
    for role, info in users.items():
        print(f"      {role:<18} user {info['username']:<24} password {info['password']}")
    print(f"      (kept in {demo_users_path(settings.home.resolve())}, mode 0600)", flush=True)


def log_paths(home: Path) -> dict[str, Path]:
    return {name: home / "logs" / f"{name}.log" for name in COMPONENTS}


HELP = "start node, worker and service on embedded defaults (+ the demo study)"
DESCRIPTION = (
    "Migrate both databases, start the DICOM node, an analysis worker and the CDS service as "
    "child processes (logs in $HER2LOW_HOME/logs), load the synthetic demo study and show its "
    "card. Ctrl-C or SIGTERM stops all three and exits 0. With the demo on, the local demo EHR "
    "key is trusted (beside any configured HER2LOW_CDS_TRUSTED_ISSUERS, with a warning)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-demo",
        action="store_true",
        help="do not load the synthetic demo study nor trust the demo EHR key",
    )


def run(args: argparse.Namespace) -> int:
    from her2low.core.commands import configured_settings

    return up(configured_settings(), demo=not args.no_demo)


COMMANDS = {"up": (HELP, DESCRIPTION, add_arguments, run)}
