"""GDSF: Greedy-Dual-Size-Frequency (Cherkasova, 1998), the size- and cost-aware policy.

Each key has a priority ``H = L + freq × cost / size`` where `L` is the policy's inflation clock: every
eviction removes the lowest-priority key and raises `L` to that key's priority, so entries that have not been
touched for a while age relative to newly touched ones. Cheap, large, rarely-hit entries go first.
`freq` counts hits since insertion; a size of 0 counts as 1 byte.

Complexity: a binary heap with lazy deletion. A touch pushes a fresh ``(H, seq, key)`` tuple and leaves the
old one stale; a pop skips stale tuples. Insert, access and eviction are O(log n) amortised; remove is O(1)
(the tuple goes stale); peeking at the k next victims is O(k log n) amortised. The heap is rebuilt when stale
tuples outnumber live ones (it stays O(n)).
Ties on `H` go to the key touched first (`seq`), which makes eviction order exact and testable.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy._common import EvictingPolicy, Room, VictimPeek, check_key


@dataclass(slots=True)
class _Entry:
    size: int
    cost: float
    freq: int
    priority: float


class LazyHeap:
    """A min-heap of (priority, seq, key) with lazy deletion; the live tuple of a key is `live[key]`."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, str]] = []
        self.live: dict[str, tuple[float, int]] = {}
        self._seq = 0

    def push(self, key: str, priority: float) -> None:
        self._seq += 1
        self.live[key] = (priority, self._seq)
        heapq.heappush(self.heap, (priority, self._seq, key))
        if len(self.heap) > 2 * len(self.live) + 64:
            # Rebuild so stale tuples never dominate memory or pop time.
            self.heap = [(p, s, k) for k, (p, s) in self.live.items()]
            heapq.heapify(self.heap)

    def discard(self, key: str) -> None:
        self.live.pop(key, None)

    def peek(self) -> tuple[float, str] | None:
        heap, live = self.heap, self.live
        while heap:
            priority, seq, key = heap[0]
            if live.get(key) == (priority, seq):
                return priority, key
            heapq.heappop(heap)
        return None

    def visit_lowest(self, visit: Callable[[str], bool]) -> None:
        """Offer live keys to `visit`, lowest first (the order `pop` would take them), until it returns False.

        The live tuples visited are popped and pushed back unchanged, so the heap's order is kept; stale
        tuples met on the way are dropped for good, as a pop would drop them. O((v + s) log n) for v keys
        visited and s stale tuples dropped: a stale tuple costs once, however often the heap is peeked.
        """
        popped: list[tuple[float, int, str]] = []
        try:
            while (top := self.peek()) is not None and visit(top[1]):
                popped.append(heapq.heappop(self.heap))
        finally:
            for item in popped:
                heapq.heappush(self.heap, item)

    def pop(self) -> tuple[float, str]:
        top = self.peek()
        if top is None:
            raise IndexError("pop from an empty LazyHeap")
        heapq.heappop(self.heap)
        del self.live[top[1]]
        return top

    def ordered(self) -> list[str]:
        return [k for _, _, k in sorted((p, s, k) for k, (p, s) in self.live.items())]

    def __len__(self) -> int:
        return len(self.live)


class GDSFPolicy(EvictingPolicy, VictimPeek):
    """Evicts the key of lowest ``L + freq × cost / size``; see the module docstring."""

    def __init__(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock = monotonic_clock
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        self.inflation = 0.0  # L
        self._entries: dict[str, _Entry] = {}
        self._heap = LazyHeap()

    def priority(self, key: str) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.priority

    def _touch(self, key: str, entry: _Entry) -> None:
        entry.priority = self.inflation + entry.freq * entry.cost / max(entry.size, 1)
        self._heap.push(key, entry.priority)

    def _add(self, key: str, size: int, cost: float) -> None:
        entry = _Entry(size=size, cost=cost, freq=1, priority=0.0)
        self._entries[key] = entry
        self.total_bytes += size
        self._touch(key, entry)

    def _update(self, key: str, size: int, cost: float) -> None:
        entry = self._entries[key]
        self.total_bytes += size - entry.size
        entry.size, entry.cost = size, cost
        entry.freq += 1
        self._touch(key, entry)

    def _evict(self) -> str:
        priority, key = self._heap.pop()
        self.inflation = max(self.inflation, priority)
        self.total_bytes -= self._entries.pop(key).size
        return key

    def peek_victim(self) -> str | None:
        top = self._heap.peek()
        return None if top is None else top[1]

    def peek_victims(self, size: int) -> list[tuple[str, int]]:
        # An eviction raises `L` but no tracked key's priority: the heap's order is the eviction order.
        room = Room(self, size)
        self._heap.visit_lowest(lambda key: room.take(key, self._entries[key].size))
        return room.victims

    def access(self, key: str) -> None:
        check_key(key)
        entry = self._entries.get(key)
        if entry is not None:
            entry.freq += 1
            self._touch(key, entry)

    def remove(self, key: str) -> None:
        check_key(key)
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._heap.discard(key)
            self.total_bytes -= entry.size

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        """Keys in eviction order (lowest priority first); O(n log n)."""
        return iter(self._heap.ordered())
