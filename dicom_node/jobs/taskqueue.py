"""The job queue: Huey on SQLite by default, on Redis when scaled (``HER2LOW_QUEUE_URL``).

The queue only carries job ids; the truth about a job (state, lease, attempts) is the node
database, so a lost message is re-sent by the scheduler and a duplicate is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey

from her2low.core.private_files import create_private_file
from her2low.core.settings import Settings

TASK_NAME = "her2low.analyse_series"


def make_huey(settings: Settings) -> Huey:
    if settings.queue_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey("her2low", url=settings.queue_url)
    if settings.queue_url:
        raise ValueError("HER2LOW_QUEUE_URL must be empty (SQLite) or a redis:// URL")
    create_private_file(settings.queue_path)  # 0640: SQLite gives -wal/-shm the same mode
    return SqliteHuey("her2low", filename=str(settings.queue_path), fsync=True)


def register(huey: Huey, run_job: Callable[[str], None]) -> Any:
    """Register the analysis task; producer and consumer call this with the same name."""

    @huey.task(name=TASK_NAME, retries=60, retry_delay=1)
    def analyse_series(job_id: str) -> None:
        run_job(job_id)

    return analyse_series
