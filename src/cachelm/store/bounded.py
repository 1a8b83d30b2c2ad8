"""`BoundedStore`: bound any `Store` by an eviction `Policy` (entries and/or bytes).

The policy decides, the inner store holds the data:

- ``put`` → ``policy.insert(key, size, cost)``; every key it evicts is deleted from the inner store. A record
  the policy refuses (larger than the byte capacity, or turned away by an admission filter) is not stored, and
  an older record under its key is deleted, so a reader never sees a stale value for a refused write.
- ``get`` hit → ``policy.access``, and if the policy no longer tracks the key afterwards (`TTLPolicy`
  collects an expired key on access) the record is deleted and the read is a miss;
  a miss (missing, expired, corrupt) → ``policy.remove``, so the policy never
  keeps paying capacity for a record that is gone. A hit on a record the policy does not know (written to a
  shared inner store by another process) adopts it: it is inserted, possibly evicting others.
- ``delete`` / ``purge`` / ``clear`` / ``expire`` → the inner store, then ``policy.remove`` for what left.
- Opening rebuilds the policy from ``inner.scan()``: records are inserted fewest stored hits first, then
  oldest first (`created`), each followed by its stored hit count replayed as accesses (capped at
  `replay_hits`); so when the inner store holds more than the capacity, the most-hit and newest records are
  the ones kept, and frequency survives a restart approximately.

Size is ``Record.size`` (value bytes); the recompute cost comes from `cost` (a function of the record;
1.0 by default), which cost-aware policies (GDSF, `AdaptiveCostPolicy`) use. A lock makes the policy safe to
share between threads; inner I/O of `get` runs outside it, so a `get` that a change overlapped (a put,
delete, eviction, purge, clear or expire moved the change counter of the key's stripe, or of all keys,
during its read) leaves the policy alone: adopting what it read would track a record just deleted, and
forgetting a miss would untrack one just written. Backend failures propagate as `BackendError`, unchanged
(`TieredStore` turns L2 failures into misses).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

from cachelm.errors import ConfigError
from cachelm.policy.base import Policy
from cachelm.policy.ttl import TTLPolicy
from cachelm.store.base import Generations, Match, Record, Store


def unit_cost(record: Record) -> float:
    """Every record costs the same to recompute."""
    return 1.0


class BoundedStore(Store):
    """`inner` bounded by `policy`; see the module docstring."""

    def __init__(
        self,
        inner: Store,
        policy: Policy,
        *,
        cost: Callable[[Record], float] = unit_cost,
        replay_hits: int = 8,
    ) -> None:
        if not isinstance(inner, Store):
            raise ConfigError(f"`inner` must be a Store, got {type(inner).__name__}")
        if not isinstance(policy, Policy):
            raise ConfigError(f"`policy` must be a Policy, got {type(policy).__name__}")
        if len(policy):
            raise ConfigError(f"`policy` must be empty, it tracks {len(policy)} keys")
        if not callable(cost):
            raise ConfigError(f"`cost` must be callable, got {cost!r}")
        if isinstance(replay_hits, bool) or not isinstance(replay_hits, int) or replay_hits < 0:
            raise ConfigError(f"`replay_hits` must be an int >= 0, got {replay_hits!r}")
        super().__init__(clock=inner.clock)
        self.inner = inner
        self.policy = policy
        self.cost = cost
        self.stats = inner.stats  # one set of counters with the store that does the I/O
        self.url = inner.url
        self.evictions = 0
        self._lock = threading.RLock()
        self._generations = Generations()  # bumped under the lock; `get` compares around its unlocked read
        self._rebuild(replay_hits)

    def _rebuild(self, replay_hits: int) -> None:
        records = sorted(self.inner.scan(), key=lambda r: (min(r.hits, replay_hits), r.created, r.key))
        with self._lock:
            for record in records:
                self._track(record)
                for _ in range(min(record.hits, replay_hits)):
                    self.policy.access(record.key)

    def _track(self, record: Record) -> list[str]:
        """Insert `record` into the policy and delete what it evicts from the inner store (lock held)."""
        evicted = self.policy.insert(record.key, record.size, self.cost(record))
        self._generations.bump(*evicted)
        for key in evicted:
            self.inner.delete(key)
        self.evictions += len(evicted)
        return evicted

    def get(self, key: str) -> Record | None:
        seen = self._generations.of(key)
        record = self.inner.get(key)
        with self._lock:
            if self._generations.of(key) != seen:  # a change overlapped the read: what was read may be gone
                return record
            if record is None:
                self.policy.remove(key)
            elif key in self.policy:
                self.policy.access(key)
                if key not in self.policy:  # the policy dropped it on access (a TTL ran out): a miss
                    self._generations.bump(key)
                    self.inner.delete(key)
                    return None
            else:
                self._track(record)
        return record

    def peek(self, key: str) -> Record | None:
        return self.inner.peek(key)

    def add_hits(self, counts: Mapping[str, int]) -> None:
        self.inner.add_hits(counts)

    def put(self, record: Record) -> None:
        if not isinstance(record, Record):
            raise ConfigError(f"`record` must be a Record, got {type(record).__name__}")
        with self._lock:
            evicted = self.policy.insert(record.key, record.size, self.cost(record))
            self._generations.bump(record.key, *evicted)
            self.evictions += len(evicted)
            try:
                if record.key not in evicted:
                    self.inner.put(record)
            except Exception:
                self.policy.remove(record.key)
                raise
            finally:
                # Victims are gone from the policy whatever happened to the put: keep the two in step.
                for key in evicted:
                    self.inner.delete(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            self._generations.bump(key)
            self.policy.remove(key)
            return self.inner.delete(key)

    def scan(self, where: Match | None = None) -> Iterator[Record]:
        return self.inner.scan(where)

    def purge(self, where: Match) -> int:
        if not isinstance(where, Match) or where.empty:
            raise ConfigError("`where` must be a Match with at least one field; use `clear()` to delete all")
        with self._lock:
            self._generations.bump_all()
            keys = [r.key for r in self.inner.scan(where)]
            count = self.inner.purge(where)
            for key in keys:
                self.policy.remove(key)
            return count

    def clear(self) -> int:
        with self._lock:
            self._generations.bump_all()
            count = self.inner.clear()
            for key in list(self.policy):
                self.policy.remove(key)
            return count

    def expire(self) -> int:
        """Delete expired records (the store's `expires`, and a `TTLPolicy`'s deadlines); O(n)."""
        with self._lock:
            self._generations.bump_all()
            count = 0
            if isinstance(self.policy, TTLPolicy):
                count += sum(1 for key in self.policy.expire() if self.inner.delete(key))
            count += self.inner.expire()
            live = {r.key for r in self.inner.scan()}
            for key in list(self.policy):
                if key not in live:
                    self.policy.remove(key)
            return count

    def __len__(self) -> int:
        return len(self.inner)

    def close(self) -> None:
        self.inner.close()
