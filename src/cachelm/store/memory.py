"""An in-process dict store: the L1 tier, and the reference model in contract tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

from cachelm.clock import Clock, wall_clock
from cachelm.store.base import Match, Record, Store, check_key


class MemoryStore(Store):
    """Records in a dict guarded by one lock. O(1) get/put/delete; scan and purge are O(n)."""

    url = "memory://"

    def __init__(self, *, clock: Clock = wall_clock) -> None:
        super().__init__(clock=clock)
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Record | None:
        check_key(key)
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return None
            if record.expired(self.clock()):
                del self._records[key]
                return None
            self._records[key] = record.with_hits(record.hits + 1)
            return record

    def add_hits(self, counts: Mapping[str, int]) -> None:
        counts = self.check_hits(counts)
        with self._lock:
            for key, n in counts.items():
                record = self._records.get(key)
                if record is not None:
                    self._records[key] = record.with_hits(record.hits + n)

    def peek(self, key: str) -> Record | None:
        check_key(key)
        with self._lock:
            record = self._records.get(key)
            return None if record is None or record.expired(self.clock()) else record

    def put(self, record: Record) -> None:
        with self._lock:
            self._records[record.key] = record

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._records.pop(key, None) is not None

    def scan(self, where: Match | None = None) -> Iterator[Record]:
        now = self.clock()
        with self._lock:
            snapshot = list(self._records.values())
        return (r for r in snapshot if not r.expired(now) and (where is None or where.matches(r)))

    def _scan_all(self) -> Iterator[Record]:
        with self._lock:
            return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)
