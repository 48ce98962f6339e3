"""Real PostgreSQL and Redis servers for scaled-mode tests and benchmarks.

Each server runs from Debian's packages (``postgresql``, ``redis-server``; installed by
``scripts/system-deps.sh``) on a free loopback port in a temporary folder, in its own process
group, and is stopped — SIGKILL of the whole group as the last word — when the context exits.
``initdb`` refuses to run as root, so under root PostgreSQL runs as the ``postgres`` account the
package creates, in a folder owned by it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from her2low.core.ports import free_port
from tests.system import popen_group, stop_group


class ServerUnavailable(RuntimeError):
    """The Debian package of a server is not installed (``make test`` installs it)."""


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise ServerUnavailable(
            "PostgreSQL is not installed (Debian package postgresql; scripts/system-deps.sh)"
        )
    return Path(found[-1]).parent


def _as_postgres() -> tuple[list[str], int | None, int | None]:
    """The command prefix that drops root to the ``postgres`` account (nothing when not root)."""
    if os.geteuid() != 0:
        return [], None, None
    account = pwd.getpwnam("postgres")
    prefix = [
        "setpriv",
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--init-groups",
        "--",
    ]
    if shutil.which("setpriv") is None:  # util-linux without setpriv: runuser forks, still fine
        prefix = ["runuser", "-u", "postgres", "--"]
    return prefix, account.pw_uid, account.pw_gid


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    folder: Path

    def url(self, database: str) -> str:
        """A plain ``postgresql://`` URL, as an integrator writes it (no driver named)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def postgres_for_tests() -> Iterator[Postgres]:
    """``postgres_server()`` for a test fixture: a server that cannot start fails the test
    (``make test`` installs it), it is not skipped."""
    import pytest

    try:
        with postgres_server() as pg:
            yield pg
    except ServerUnavailable as exc:
        pytest.fail(f"{exc}; `make test` installs it")


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """initdb + postgres on a free port; trust authentication on loopback only."""
    bindir = postgres_bindir()
    prefix, uid, gid = _as_postgres()
    folder = Path(tempfile.mkdtemp(prefix="her2low-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        if uid is not None and gid is not None:
            os.chown(folder, uid, gid)
        data = folder / "data"
        user = "her2low"
        init = subprocess.run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=folder,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
        port = free_port()
        log = open(folder / "postgres.log", "ab")  # noqa: SIM115 - closed in finally
        try:
            proc = popen_group(
                [
                    *prefix,
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(folder),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                    # a test server: durability of its throwaway data is not under test
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                ],
                stdout=log,
                stderr=log,
                cwd=folder,
            )
        finally:
            log.close()
        server = Postgres(port=port, user=user, folder=folder)
        _wait_postgres(server, proc)
        yield server
    finally:
        if proc is not None:
            stop_group(proc, sig=signal.SIGINT, timeout=20)  # SIGINT: fast shutdown
        shutil.rmtree(folder, ignore_errors=True)


def _wait_postgres(server: Postgres, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                "postgres exited: " + (server.folder / "postgres.log").read_text()[-2000:]
            )
        try:
            with psycopg.connect(
                f"host=127.0.0.1 port={server.port} user={server.user} dbname=postgres",
                connect_timeout=2,
            ):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass(frozen=True)
class Redis:
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextmanager
def redis_server() -> Iterator[Redis]:
    """redis-server on a free port, no persistence (the queue only wakes workers)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerUnavailable(
            "redis-server is not installed (Debian package redis-server; scripts/system-deps.sh)"
        )
    folder = Path(tempfile.mkdtemp(prefix="her2low-redis-"))
    port = free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(folder / "redis.log", "ab") as log:
            proc = popen_group(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(folder),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=log,
            )
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("redis-server exited: " + (folder / "redis.log").read_text())
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.close()
        yield Redis(port=port)
    finally:
        if proc is not None:
            stop_group(proc, timeout=10)
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
