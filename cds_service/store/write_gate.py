"""Serialising SQLite writers across processes, checkpointing their WAL off the commit path, and
re-running a write that lost a unique-key race."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.exc import IntegrityError

_T = TypeVar("_T")
log = logging.getLogger(__name__)

#: Commits of this process between two of its checkpoints (a hook call writes about ten pages).
CHECKPOINT_EVERY = 64
#: SQLite's own checkpoint, run inside the commit that takes the WAL past this many pages, is
#: left only as a safety net (its default is 1000 pages).
AUTOCHECKPOINT_PAGES = 10_000
#: A checkpoint thread with nothing to do for this long ends (the next commits start another).
IDLE_SECONDS = 30.0
THREAD_NAME = "her2low-wal-checkpoint"


class WalCheckpointer:
    """Copies the WAL back into the database file on a thread of its own, not inside a commit.

    Left to itself, SQLite checkpoints in the commit that takes the WAL past 1000 pages: that
    commit copies the pages and syncs the files while its writer still holds the write gate, so
    every other worker's commit waits behind it, and under load each of those stalls delays all
    the calls queued meanwhile. Here every ``CHECKPOINT_EVERY`` commits of this process wake a
    thread that runs a PASSIVE checkpoint on its own connection: it never waits for readers or
    writers, and writers go on appending to the WAL while it copies. SQLite's own checkpoint
    stays as a safety net at ``AUTOCHECKPOINT_PAGES``.
    """

    def __init__(self, database: str, every: int = CHECKPOINT_EVERY) -> None:
        self.database = database
        self.every = every
        self.runs = 0  # checkpoints done by this process (read by tests)
        self._commits = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def committed(self) -> None:
        """Count one commit; every ``every``-th wakes the checkpoint thread (started if none).

        A thread does not survive a fork, and one idle for ``IDLE_SECONDS`` ends (it holds a
        connection), so a new one is started when needed.
        """
        with self._lock:
            self._commits += 1
            if self._commits % self.every:
                return
            if self._thread is None or not self._thread.is_alive():
                self._wake = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(self._wake,), name=THREAD_NAME, daemon=True
                )
                self._thread.start()
            self._wake.set()

    def _run(self, wake: threading.Event) -> None:
        try:
            conn = sqlite3.connect(self.database, timeout=0, check_same_thread=False)
        except sqlite3.Error as exc:  # the next wake-up tries again; the safety net remains
            log.warning("WAL checkpoint failed", extra={"error_class": type(exc).__name__})
            return
        try:
            while wake.wait(IDLE_SECONDS):
                wake.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # e.g. a full disk: SQLite's safety net remains
                    log.warning("WAL checkpoint failed", extra={"error_class": type(exc).__name__})
                self.runs += 1
        finally:
            conn.close()

    def attach(self, engine: Engine) -> None:
        """Count ``engine``'s commits, and move SQLite's own checkpoint to the safety net.

        Connections already pooled (the start-up migration check's) are closed, so every
        connection the engine hands out from now on has the setting.
        """

        def _safety_net(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")

        event.listen(engine, "connect", _safety_net)
        event.listen(engine, "commit", lambda _conn: self.committed())
        engine.dispose()


class WriteGate:
    """Serializes this host's writers to one SQLite file: a thread lock plus ``flock``.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (1, 2, 5,
    10 … ms, its default busy handler), which under a few concurrent hook calls turned into
    tails of 100+ ms. Queuing on a lock instead wakes the next writer as soon as the lock is
    released. The thread lock covers gunicorn threads, ``flock`` (kernel-queued, released if the
    process dies) covers the workers; the file descriptor is reopened after a fork because
    ``flock`` belongs to the open file description. Other databases: no gate.
    """

    def __init__(self, path: str | None, checkpointer: WalCheckpointer | None = None) -> None:
        self.path = path
        self.checkpointer = checkpointer
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    @classmethod
    def for_engine(cls, engine: Engine) -> WriteGate:
        """The gate of ``engine``'s SQLite file (none for other databases), with its checkpointer."""
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return cls(None)
        checkpointer = WalCheckpointer(database)
        checkpointer.attach(engine)
        return cls(f"{database}.write-lock", checkpointer)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            assert self.path is not None
            if self._fd is not None:
                os.close(self._fd)  # the parent's description; the parent keeps its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with self._lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        if self.checkpointer is not None:  # the hook path commits on the DBAPI connection
            self.checkpointer.committed()


def retry_on_conflict(write: Callable[[], _T], *, attempts: int) -> _T:
    """Run a write transaction again when a concurrent writer took its unique key first.

    Two service instances (or threads) may insert the same natural key at once; the loser's
    transaction fails with an IntegrityError and, re-run, sees the winner's row.
    """
    for attempt in range(attempts):
        try:
            return write()
        except IntegrityError:
            if attempt == attempts - 1:
                raise
    raise ValueError("attempts must be at least 1")
