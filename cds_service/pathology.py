"""Pathology HER2 results received from the EHR: the CDS Hooks ``her2`` prefetch, read by
:mod:`cds_service.biopsy`, classified into the ASCO/CAP groups (0 / low / positive).

The biopsy the MRI was read against is not a *later* result: only a reading dated after the
MRI's acquisition is kept (:func:`record_from_prefetch`), for the concordance view.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, date, datetime, time

from cds_service.biopsy import BiopsyHer2, BiopsyReading
from cds_service.lru import LruDict
from cds_service.store import Her2Pathology, PathologySource, Store

_NOT_AMPLIFIED = re.compile(r"(not\s+amplified|non-?amplified|ish\s*(-|neg)|fish\s*(-|neg))")
_AMPLIFIED = re.compile(r"(amplified|ish\s*(\+|pos)|fish\s*(\+|pos))")


def classify_text(text: str) -> tuple[Her2Pathology, str] | None:
    """A pathology report's HER2 wording as (group, score); None when it does not say.

    IHC 2+ without an ISH result is equivocal and not classified.
    """
    t = text.strip().lower()
    if re.search(r"\b3\s*\+", t):
        return Her2Pathology.POSITIVE, "3+"
    if re.search(r"\b2\s*\+", t):
        if _NOT_AMPLIFIED.search(t):
            return Her2Pathology.LOW, "2+ ISH-"
        if _AMPLIFIED.search(t):
            return Her2Pathology.POSITIVE, "2+ ISH+"
        return None
    if re.search(r"\b1\s*\+", t) or re.search(r"her-?2[\s-]*low", t):
        return Her2Pathology.LOW, "1+" if "1" in t else ""
    if re.search(r"\bpositive\b", t) and "negative" not in t:
        return Her2Pathology.POSITIVE, ""
    return None


def classify_reading(reading: BiopsyReading) -> tuple[Her2Pathology, str] | None:
    """The biopsy reading of the hook's prefetch as a pathology group (None: not usable)."""
    if reading.status is BiopsyHer2.ZERO:
        return Her2Pathology.ZERO, "0"
    if reading.status is BiopsyHer2.OTHER and reading.text:
        return classify_text(reading.text)
    return None


def parse_date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(text[:10]), time(0))
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class KnownSources:
    """(result id, source key) pairs the database holds, remembered by one process.

    Pathology rows are append-only and unique per pair, so a pair once stored stays stored. An
    EHR sends a patient's later HER2 result in every call's prefetch; without this each call
    attempted the insert and had the unique key refuse it (1.7 ms, doubling the call). Bounded
    LRU; a database restore restarts the processes (``docs/operations.md``), which forgets it.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._pairs: LruDict[tuple[str, str], bool] = LruDict(capacity)
        self._lock = threading.Lock()

    def __contains__(self, pair: tuple[str, str]) -> bool:
        with self._lock:
            return self._pairs.touch(pair) is not None

    def add(self, pair: tuple[str, str]) -> None:
        with self._lock:
            self._pairs.put(pair, True)

    def __len__(self) -> int:
        return len(self._pairs)


def record_from_prefetch(
    store: Store,
    result_id: str,
    acquired_at: datetime,
    reading: BiopsyReading,
    actor: str,
    known: KnownSources | None = None,
) -> bool:
    """Keep a HER2 Observation from the EHR dated after the MRI as the case's pathology.

    Idempotent: the key is the LOINC code, date and classification, so the same Observation in
    the next call's prefetch adds nothing (and, with ``known``, costs no database round trip).
    Returns whether a new result was stored.
    """
    reported = parse_date(reading.date)
    if reported is None or reported <= acquired_at:
        return False  # the biopsy the MRI was read against, not a later result
    found = classify_reading(reading)
    if found is None:
        return False
    her2, score = found
    key = f"ehr:{reading.code}:{reading.date}:{her2.value}:{score}"
    if known is not None and (result_id, key) in known:
        return False
    stored = store.add_pathology(
        result_id,
        her2,
        score=score,
        source=PathologySource.EHR,
        source_key=key,
        entered_by=actor,
        reported_at=reported,
    )
    if known is not None:
        known.add((result_id, key))  # stored now, or already (the unique key refused it)
    return stored
