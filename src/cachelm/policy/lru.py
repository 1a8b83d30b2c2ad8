"""LRU and FIFO: one ordered dict each, O(1) per operation.

`OrderedDict.move_to_end` and `popitem(last=False)` are O(1) (a hash table over a doubly linked list), so
insert, access, remove and each eviction cost O(1), and peeking at the k next victims O(k). Iteration yields
keys in eviction order (victim first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy._common import EvictingPolicy, Room, VictimPeek, check_key


class LRUPolicy(EvictingPolicy, VictimPeek):
    """Least recently used goes first. A hit or an update makes a key the most recent."""

    def __init__(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock = monotonic_clock
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        self._sizes: OrderedDict[str, int] = OrderedDict()  # oldest first

    def _add(self, key: str, size: int, cost: float) -> None:
        self._sizes[key] = size
        self.total_bytes += size

    def _update(self, key: str, size: int, cost: float) -> None:
        self.total_bytes += size - self._sizes[key]
        self._sizes[key] = size
        self._on_hit(key)

    def _on_hit(self, key: str) -> None:
        self._sizes.move_to_end(key)

    def _evict(self) -> str:
        key, size = self._sizes.popitem(last=False)
        self.total_bytes -= size
        return key

    def peek_victim(self) -> str | None:
        return next(iter(self._sizes), None)

    def peek_victims(self, size: int) -> list[tuple[str, int]]:
        return Room(self, size).take_from(self._sizes.items())  # oldest first, as `_evict` pops them

    def access(self, key: str) -> None:
        check_key(key)
        if key in self._sizes:
            self._on_hit(key)

    def remove(self, key: str) -> None:
        check_key(key)
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total_bytes -= size

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sizes))


class FIFOPolicy(LRUPolicy):
    """First in, first out: hits and updates do not reorder. The baseline S3-FIFO improves on."""

    def _on_hit(self, key: str) -> None:
        pass
