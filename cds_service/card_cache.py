"""Serialized cards prepared once per stored prediction, re-stamped per call.

The card and its Observation are deterministic for a stored prediction row (rows are
insert-only: new descriptors, a new result revision or a tumour-board decision each insert a new
row with a new id and card uuid), except for three per-call inputs: the patient id in
``Observation.subject``, the biopsy line of the detail and whether that biopsy makes the card a
discordance ``warning``. So each worker serializes a card once per (prediction id, result fields
it shows) with placeholders for the patient and the biopsy line, and a call only splices the
JSON-escaped values into the cached bytes. The key is the prediction row id, so nothing needs
invalidating across workers or instances: a changed input is a new row, hence a new key.

The EHR's ImagingStudy ids (``imaging`` prefetch) are per-call too: each ImagingStudy reference
by StudyInstanceUID carries a mark where the literal ``reference`` goes when the EHR names that
study, so a call with imaging prefetch costs a splice, not a parse and a re-serialization of
the whole card (that cost 0.5 ms of a 2 ms call in process; ``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cds_service.fhir_transparency import mark_imaging_studies
from cds_service.lru import LruDict

# Random per process: a placeholder can never be produced by stored or EHR data.
_NONCE = uuid.uuid4().hex


class Slot(StrEnum):
    """Per-call values spliced into a prepared card."""

    PATIENT_ID = f"@@patient-{_NONCE}@@"
    BIOPSY_LINE = f"@@biopsy-{_NONCE}@@"


# The key ``mark_imaging_studies`` puts first in an ImagingStudy reference, with its UID value.
_IMAGING_MARK = f"@@imaging-{_NONCE}@@"
_IMAGING_ENTRY = re.escape(json.dumps(_IMAGING_MARK)) + r':"(?:[^"\\]|\\.)*",'
_SLOT_PATTERN = re.compile(
    "(" + "|".join([re.escape(s.value) for s in Slot] + [_IMAGING_ENTRY]) + ")"
)


@dataclass(frozen=True)
class _StudyReference:
    """Where ``"reference": "ImagingStudy/<id>",`` goes when the EHR names ``study_uid``."""

    study_uid: str

    @classmethod
    def parse(cls, entry: str) -> _StudyReference:
        return cls(json.loads(entry[entry.index(":") + 1 : -1]))


def dumps(value: Any) -> str:
    """Compact JSON as served (UTF-8, no spaces, key order kept)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class CardTemplate:
    """A ``{"cards": [card]}`` body serialized once, with slots for per-call values."""

    __slots__ = ("_named", "_parts", "_slots")

    def __init__(self, card: Mapping[str, Any]) -> None:
        body = dumps({"cards": [mark_imaging_studies(card, _IMAGING_MARK)]})
        pieces = _SLOT_PATTERN.split(body)
        self._parts = [p.encode() for p in pieces[0::2]]
        self._slots = [
            _StudyReference.parse(p) if p.startswith('"') else Slot(p) for p in pieces[1::2]
        ]
        if _IMAGING_MARK in "".join(pieces[0::2]):
            raise ValueError("an ImagingStudy reference mark was left unparsed")
        self._named = tuple({slot for slot in self._slots if isinstance(slot, Slot)})

    @property
    def slots(self) -> tuple[Slot, ...]:
        """The per-call values the card needs (each once)."""
        return self._named

    def render(
        self, values: Mapping[Slot, str], study_ids: Mapping[str, str] | None = None
    ) -> bytes:
        """The body with each slot replaced by its JSON-escaped value (inside a JSON string), and
        each ImagingStudy reference the EHR names (``study_ids``: StudyInstanceUID → id) given
        its literal ``reference`` first."""
        if not self._slots:
            return self._parts[0]
        escaped = {slot: dumps(values[slot])[1:-1].encode() for slot in self._named}
        out = [self._parts[0]]
        for slot, part in zip(self._slots, self._parts[1:], strict=True):
            if isinstance(slot, Slot):
                out.append(escaped[slot])
            elif study_ids and slot.study_uid in study_ids:
                reference = dumps(f"ImagingStudy/{study_ids[slot.study_uid]}")
                out.append(f'"reference":{reference},'.encode())
            out.append(part)
        return b"".join(out)


@dataclass(frozen=True)
class PreparedCard:
    """What a prediction row shows, prepared once.

    ``plain`` is the card for any biopsy reading that is not a discordance; ``discordant`` the
    ``warning`` card (only when the estimate is at/above threshold, else None); both None when
    the row has nothing to show (``warning``: why, logged on each call). ``needs_biopsy``: the
    call must read the biopsy prefetch.
    """

    card_uuid: str
    plain: CardTemplate | None
    discordant: CardTemplate | None
    needs_biopsy: bool
    warning: str | None = None


class CardCache:
    """A small thread-safe LRU of PreparedCard by key (gthread workers share one per process)."""

    def __init__(self, maxsize: int = 512) -> None:
        self._items: LruDict[Hashable, PreparedCard] = LruDict(maxsize)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def maxsize(self) -> int:
        return self._items.capacity

    def get_or_build(self, key: Hashable, build: Callable[[], PreparedCard]) -> PreparedCard:
        """The cached entry, or ``build()`` stored under ``key`` (built outside the lock)."""
        with self._lock:
            found = self._items.touch(key)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        built = build()
        with self._lock:
            self._items.put(key, built)
        return built

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
