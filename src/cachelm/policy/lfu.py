"""LFU with O(1) frequency buckets (Shah, Mitra and Matani, "An O(1) algorithm for implementing the LFU
cache eviction scheme", 2010).

Buckets of equal frequency form a doubly linked list in increasing frequency; each bucket is an ordered dict
of its keys, oldest first. A hit moves a key to the next bucket (created when missing, the old one unlinked
when it empties), so insert, access, remove and each eviction are O(1), and peeking at the k next victims
O(k). The victim is the least recently touched key of the lowest-frequency bucket. Frequencies count hits
since the key was (re)inserted: an evicted key starts again at 1, as in the paper; there is no aging (use
TinyLFU or the adaptive policy for that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy._common import EvictingPolicy, Room, VictimPeek, check_key


class _Bucket:
    __slots__ = ("freq", "keys", "next", "prev")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys: OrderedDict[str, None] = OrderedDict()
        self.prev: _Bucket = self
        self.next: _Bucket = self


class LFUPolicy(EvictingPolicy, VictimPeek):
    """Least frequently used goes first; ties go to the least recently touched."""

    def __init__(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock = monotonic_clock
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        self._head = _Bucket(0)  # sentinel of a circular list; _head.next is the lowest frequency
        self._bucket: dict[str, _Bucket] = {}
        self._sizes: dict[str, int] = {}

    def frequency(self, key: str) -> int:
        """Hits + 1 since `key` was inserted; 0 when not tracked."""
        bucket = self._bucket.get(key)
        return 0 if bucket is None else bucket.freq

    def _link_after(self, node: _Bucket, freq: int) -> _Bucket:
        new = _Bucket(freq)
        new.prev, new.next = node, node.next
        node.next.prev = new
        node.next = new
        return new

    def _unlink_if_empty(self, node: _Bucket) -> None:
        if not node.keys:
            node.prev.next = node.next
            node.next.prev = node.prev

    def _add(self, key: str, size: int, cost: float) -> None:
        first = self._head.next
        if first is self._head or first.freq != 1:
            first = self._link_after(self._head, 1)
        first.keys[key] = None
        self._bucket[key] = first
        self._sizes[key] = size
        self.total_bytes += size

    def _bump(self, key: str) -> None:
        node = self._bucket[key]
        nxt = node.next
        if nxt is self._head or nxt.freq != node.freq + 1:
            nxt = self._link_after(node, node.freq + 1)
        del node.keys[key]
        nxt.keys[key] = None
        self._bucket[key] = nxt
        self._unlink_if_empty(node)

    def _update(self, key: str, size: int, cost: float) -> None:
        self.total_bytes += size - self._sizes[key]
        self._sizes[key] = size
        self._bump(key)

    def _evict(self) -> str:
        node = self._head.next
        key, _ = node.keys.popitem(last=False)
        self._unlink_if_empty(node)
        del self._bucket[key]
        self.total_bytes -= self._sizes.pop(key)
        return key

    def peek_victim(self) -> str | None:
        node = self._head.next
        return None if node is self._head else next(iter(node.keys))

    def peek_victims(self, size: int) -> list[tuple[str, int]]:
        return Room(self, size).take_from((key, self._sizes[key]) for key in self._eviction_order())

    def _eviction_order(self) -> Iterator[str]:
        """Keys lowest frequency first, least recently touched first within one; lazy, O(1) per key (every
        linked bucket holds a key)."""
        node = self._head.next
        while node is not self._head:
            yield from node.keys
            node = node.next

    def access(self, key: str) -> None:
        check_key(key)
        if key in self._bucket:
            self._bump(key)

    def remove(self, key: str) -> None:
        check_key(key)
        node = self._bucket.pop(key, None)
        if node is None:
            return
        del node.keys[key]
        self._unlink_if_empty(node)
        self.total_bytes -= self._sizes.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self._bucket

    def __len__(self) -> int:
        return len(self._bucket)

    def __iter__(self) -> Iterator[str]:
        """Keys in eviction order: lowest frequency first, least recently touched first within one."""
        return iter(list(self._eviction_order()))
