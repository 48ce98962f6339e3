"""Serialising SQLite writers across processes, and re-running a write that lost a unique-key race."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import (
    Engine,
)
from sqlalchemy.exc import IntegrityError

_T = TypeVar("_T")


class WriteGate:
    """Serializes this host's writers to one SQLite file: a thread lock plus ``flock``.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps (1, 2, 5,
    10 … ms, its default busy handler), which under a few concurrent hook calls turned into
    tails of 100+ ms. Queuing on a lock instead wakes the next writer as soon as the lock is
    released. The thread lock covers gunicorn threads, ``flock`` (kernel-queued, released if the
    process dies) covers the workers; the file descriptor is reopened after a fork because
    ``flock`` belongs to the open file description. Other databases: no gate.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    @classmethod
    def for_engine(cls, engine: Engine) -> WriteGate:
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return cls(None)
        return cls(f"{database}.write-lock")

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
