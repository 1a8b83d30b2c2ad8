"""`TieredStore`: a read-through L1 (in-process) over an L2 (SQLite, Redis…).

- ``get``: L1 first; on an L1 miss, L2, and an L2 hit fills L1. An L2 failure (`BackendError`) is a miss and
  increments ``stats.l2_errors`` (and ``stats.errors``): a failing shared tier never fails a request. L1 is
  in-process and expected not to fail; if it does, it counts in ``stats.l1_errors`` and is treated as a miss.
- ``put`` writes L2 first (the source of truth), then L1. If L2 fails, L1's copy of the key is dropped and the
  `BackendError` propagates (the caller decides; the exact cache counts it and serves the computed answer).
- ``delete`` / ``purge`` / ``clear`` / ``expire`` apply to both tiers; counts returned are L2's.
- ``invalidate_local(key)`` / ``purge_local(where)`` / ``clear_local()`` drop L1 entries only: a pub/sub
  listener calls them when another replica writes or deletes keys, so L1 stays coherent with a shared L2.
- L1 never keeps what a concurrent change made stale. Every change (put, delete, purge, clear, expire, the
  ``*_local`` calls) bumps a generation counter of the key's stripe (of all stripes for a bulk change) after
  changing L2, under a lock that also guards L1 writes. A get fills L1, and a put writes L1, only when the
  key's generation is the one seen before its L2 call; otherwise the L2 answer is returned but not kept
  (a put drops L1's copy). Without this, a fill that read L2 before a delete or purge put the erased record
  back into L1, and two writers of one key could leave L1 holding the value L2 lost.

L1 is typically ``BoundedStore(MemoryStore(), LRUPolicy(max_entries=...))``. Hit counts (`Record.hits`) are
L2's: an L2 read counts itself, and L1 hits are counted here and added to L2 in batches (`L2.add_hits`) once
`hit_flush` of them are pending, before every `scan` (so a scan — a refresh's valuation, the entry browser —
sees this process's hits), and on `close`. Pending hits of a key that is written or deleted are dropped (they
belong to the old record). Other processes see a replica's L1 hits after its next batch; a crash loses at most
one batch; a failing L2 loses that batch (counted in ``l2_errors``): counts are a value signal, not data.
Counters: ``stats.l1_hits``, ``l2_hits``, ``misses``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cachelm.errors import BackendError, ConfigError
from cachelm.store.base import Generations, Match, PendingHits, Record, Store, StoreStats


@dataclass(kw_only=True)
class TieredStats(StoreStats):
    """`StoreStats` plus where reads were answered."""

    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    l1_errors: int = 0
    l2_errors: int = 0


class TieredStore(Store):
    """`l1` in front of `l2`; see the module docstring."""

    def __init__(self, l1: Store, l2: Store, *, hit_flush: int = 64) -> None:
        for name, store in (("l1", l1), ("l2", l2)):
            if not isinstance(store, Store):
                raise ConfigError(f"`{name}` must be a Store, got {type(store).__name__}")
        if l1 is l2:
            raise ConfigError("`l1` and `l2` must be different stores")
        if isinstance(hit_flush, bool) or not isinstance(hit_flush, int) or hit_flush < 1:
            raise ConfigError(f"`hit_flush` must be an int >= 1, got {hit_flush!r}")
        super().__init__(clock=l2.clock)
        self.l1, self.l2 = l1, l2
        self.stats: TieredStats = TieredStats()
        self.url = l2.url
        self._lock = threading.Lock()  # orders L1 writes against generation bumps
        self._generations = Generations()
        self.hit_flush = hit_flush
        self._hits = PendingHits()  # L1 hits not yet added to L2

    def _changed(self, key: str | None) -> None:
        """Mark `key` (every key when None) changed in L2; called with the lock held."""
        if key is None:
            self._generations.bump_all()
        else:
            self._generations.bump(key)

    def _l1(self, action: str, *args: object) -> object:
        try:
            return getattr(self.l1, action)(*args)
        except BackendError:
            self.stats.add("l1_errors")
            self.stats.add("errors")
            return None

    def get(self, key: str) -> Record | None:
        record = self._l1("get", key)
        if isinstance(record, Record):
            self.stats.add("l1_hits")
            self._hits.add(key)
            if self._hits.total >= self.hit_flush:
                self.flush_hits()
            return record
        seen = self._generations.of(key)
        try:
            record = self.l2.get(key)
        except BackendError:
            self.stats.add("l2_errors")
            self.stats.add("errors")
            return None
        if record is None:
            self.stats.add("misses")
            return None
        self.stats.add("l2_hits")
        with self._lock:
            if self._generations.of(key) == seen:  # else a change landed during the L2 read: do not keep it
                self._l1("put", record)
        return record

    def peek(self, key: str) -> Record | None:
        record = self._l1("peek", key)
        if isinstance(record, Record):
            return record
        return self.l2.peek(key)

    def put(self, record: Record) -> None:
        if not isinstance(record, Record):
            raise ConfigError(f"`record` must be a Record, got {type(record).__name__}")
        self._hits.drop(record.key)  # they were the old record's
        seen = self._generations.of(record.key)
        stored = False
        try:
            self.l2.put(record)
            stored = True
        finally:
            with self._lock:
                # Keep our value in L1 only if no other change to the key landed since our L2 write began:
                # theirs may have reached L2 before ours and L1 after it. L2 failed: drop L1's copy, too.
                if stored and self._generations.of(record.key) == seen:
                    self._l1("put", record)
                else:
                    self._l1("delete", record.key)
                self._changed(record.key)

    def flush_hits(self) -> int:
        """Add the pending L1 hits to L2 now; how many were added (0 when L2 failed: they are dropped)."""
        pending = self._hits.take()
        if not pending:
            return 0
        try:
            self.l2.add_hits(pending)
        except BackendError:
            self.stats.add("l2_errors")
            self.stats.add("errors")
            return 0
        return sum(pending.values())

    def add_hits(self, counts: Mapping[str, int]) -> None:
        self.l2.add_hits(counts)

    def delete(self, key: str) -> bool:
        self._hits.drop(key)
        try:
            deleted = bool(self.l2.delete(key))
        finally:
            local = self._local(key, "delete", key)
        return deleted or bool(local)

    def _local(self, changed: str | None, action: str, *args: object) -> object:
        """Run `action` on L1 and mark `changed` (every key when None) as changed, both under the lock."""
        with self._lock:
            result = self._l1(action, *args)
            self._changed(changed)
        return result

    def invalidate_local(self, key: str) -> bool:
        """Drop `key` from L1 only (another replica changed it in L2); True if L1 held it."""
        return bool(self._local(key, "delete", key))

    def purge_local(self, where: Match) -> int:
        """Drop the L1 entries matching `where` only (another replica purged them from L2); how many."""
        if not isinstance(where, Match) or where.empty:
            raise ConfigError("`where` must be a Match with at least one field; use `clear_local()`")
        count = self._local(None, "purge", where)
        return count if isinstance(count, int) else 0

    def clear_local(self) -> None:
        """Drop all of L1 (e.g. after a pub/sub reconnect, when invalidations may have been missed)."""
        self._local(None, "clear")

    def scan(self, where: Match | None = None) -> Iterator[Record]:
        self.flush_hits()
        return self.l2.scan(where)

    def purge(self, where: Match) -> int:
        if not isinstance(where, Match) or where.empty:
            raise ConfigError("`where` must be a Match with at least one field; use `clear()` to delete all")
        try:
            return self.l2.purge(where)
        finally:  # after L2, so no read of L2 from before the purge can refill L1 (see the module docstring)
            self._local(None, "purge", where)

    def clear(self) -> int:
        self._hits.drop()
        try:
            return self.l2.clear()
        finally:
            self._local(None, "clear")

    def expire(self) -> int:
        try:
            return self.l2.expire()
        finally:
            self._local(None, "expire")

    def __len__(self) -> int:
        return len(self.l2)

    def close(self) -> None:
        self.flush_hits()
        with contextlib.suppress(BackendError):
            self.l1.close()
        self.l2.close()
