"""Hook lookups reused within one process while the database's hook generation is unchanged.

An EHR opens the same chart many times (several clinicians, refreshes, the patient-view of each
encounter), and each call used to repeat the same lookup. A lookup is kept with the
``hook_generation`` it was read at, beside the others of that generation (a lookup of another
generation drops them); the call that reuses it records its jti only if the database still has
that generation (``Store.record_call(..., generation=)``), else it answers again from a fresh lookup.
A process therefore never shows a card older than the last committed change at the time of the
call, whichever process or tool made the change (the generation is bumped by triggers).
"""

from __future__ import annotations

import threading

from cds_service.lru import LruDict
from cds_service.store.values import HookLookup

Keys = tuple[tuple[str, str], ...]


class HookLookupCache:
    """A bounded LRU of lookups by patient keys, all of one generation (the latest read)."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._entries: LruDict[Keys, HookLookup] = LruDict(capacity)
        self._generation: int | None = None
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._entries.capacity

    def get(self, keys: Keys) -> HookLookup | None:
        with self._lock:
            return self._entries.touch(keys)

    def put(self, keys: Keys, lookup: HookLookup) -> None:
        """Keep ``lookup``; one of another generation than the kept ones drops them all.

        A newer generation: something changed. An older one: another thread read before a
        change this one has seen (its next call's check refreshes it), or the database went
        back (a restore): in both cases the lookups kept so far must not be reused.
        """
        if lookup.generation is None or self.capacity == 0:
            return
        with self._lock:
            if lookup.generation != self._generation:
                self._entries.clear()
                self._generation = lookup.generation
            self._entries.put(keys, lookup)

    def __len__(self) -> int:
        return len(self._entries)
