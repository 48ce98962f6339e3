"""The least-recently-used bound the service's per-process caches share.

Not locked: each cache (prepared cards, hook lookups, known pathology sources) holds its own
lock around it, often around more than one step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruDict(OrderedDict[K, V]):
    """A dict kept to ``capacity`` entries; the least recently used goes first."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def touch(self, key: K) -> V | None:
        """The value under ``key`` (None if absent), now the most recently used."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` under ``key`` as the most recently used; drop the oldest past capacity."""
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
