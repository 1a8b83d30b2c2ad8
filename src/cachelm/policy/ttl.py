"""TTL: entries expire a fixed time after they were written (absolute) or last used (sliding).

`TTLPolicy` wraps an inner policy that handles capacity (an `LRUPolicy` by default). Expired keys go first:
every `insert` first evicts every expired key (returned at the head of the evicted list, oldest deadline
first), then lets the inner policy make room. ``access`` of an expired key collects it instead of counting a
hit (so a caller that checks ``key in policy`` after ``access`` sees the expiry, as `BoundedStore` and the
simulator do); with `sliding`, a hit on a live key extends it. `expire()` collects expired keys on demand.

Because the TTL is one constant, deadlines are ordered like last writes (absolute) or last uses (sliding), so
one ordered dict keeps them sorted: insert, access and remove are O(1), and each expired key costs O(1) to
collect. Time comes only from the injected `timer`, which must not go backwards (a monotonic clock).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy._common import check_entry, check_key
from cachelm.policy.base import Policy
from cachelm.policy.lru import LRUPolicy


class TTLPolicy(Policy):
    """Expiry on top of an inner capacity policy; see the module docstring."""

    def __init__(
        self,
        inner: Policy | None = None,
        *,
        ttl: float,
        sliding: bool = False,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        timer: Clock = monotonic_clock,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
            raise ConfigError(f"`ttl` must be a finite number of seconds > 0, got {ttl!r}")
        if not isinstance(sliding, bool):  # "no" is truthy: it would have meant sliding expiry
            raise ConfigError(f"`sliding` must be a bool, got {sliding!r}")
        if inner is not None and not isinstance(inner, Policy):
            raise ConfigError(f"`inner` must be a Policy or None, got {type(inner).__name__}")
        if inner is None:
            inner = LRUPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        elif max_entries is not None or max_bytes is not None:
            raise ConfigError("pass `max_entries`/`max_bytes` to the `inner` policy, not to TTLPolicy")
        elif len(inner):
            raise ConfigError(f"`inner` must be empty, it tracks {len(inner)} keys")
        super().__init__(max_entries=inner.max_entries, max_bytes=inner.max_bytes, timer=timer)
        self.inner = inner
        self.ttl = float(ttl)
        self.sliding = sliding
        self._deadlines: OrderedDict[str, float] = OrderedDict()  # earliest deadline first

    def deadline(self, key: str) -> float | None:
        """When `key` expires (timer seconds), or None when it is not tracked."""
        return self._deadlines.get(key)

    def is_expired(self, key: str) -> bool:
        deadline = self._deadlines.get(key)
        return deadline is not None and self.timer() >= deadline

    def expire(self) -> list[str]:
        """Forget every expired key now; returns them, earliest deadline first."""
        now, expired = self.timer(), []
        while self._deadlines:
            key, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                break
            del self._deadlines[key]
            self.inner.remove(key)
            expired.append(key)
        self.total_bytes = self.inner.total_bytes
        return expired

    def insert(self, key: str, size: int, cost: float = 1.0) -> list[str]:
        check_entry(key, size, cost)
        # An expired `key` that is being rewritten is not reported: a caller drops every listed key, and
        # would drop the value it is writing now (or see `key` twice when the rewrite is refused below).
        evicted = [expired for expired in self.expire() if expired != key]
        for victim in self.inner.insert(key, size, cost):
            self._deadlines.pop(victim, None)
            evicted.append(victim)
        if key in self.inner:
            self._deadlines.pop(key, None)  # a write restarts the TTL in both modes
            self._deadlines[key] = self.timer() + self.ttl
        self.total_bytes = self.inner.total_bytes
        return evicted

    def access(self, key: str) -> None:
        check_key(key)
        if key not in self._deadlines:
            return
        if self.is_expired(key):
            self.remove(key)
            return
        self.inner.access(key)
        if self.sliding:
            self._deadlines.move_to_end(key)
            self._deadlines[key] = self.timer() + self.ttl

    def remove(self, key: str) -> None:
        check_key(key)
        self._deadlines.pop(key, None)
        self.inner.remove(key)
        self.total_bytes = self.inner.total_bytes

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)
