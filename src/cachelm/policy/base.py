"""The eviction-policy interface.

A policy tracks keys, their sizes and costs, and decides which keys to evict when a capacity (entries and/or
bytes) is exceeded. It holds no values: a store or tier asks it what to drop and drops it. Every policy is
tested with one contract mixin (``tests/unit/policy_contract.py``) plus its own exact-eviction-order tests.

Contract:
- ``insert(key, size, cost)`` admits or updates `key` and returns the keys evicted to make room, in eviction
  order. The returned list may contain `key` itself when the policy rejects it (e.g. larger than capacity or
  refused by an admission filter); then `key` is not tracked afterwards.
- ``access(key)`` records a hit on a tracked key (a no-op for an unknown key).
- ``remove(key)`` forgets `key` (explicit delete / invalidation); a no-op for an unknown key.
- After any call, ``len(policy) <= max_entries`` and ``policy.total_bytes <= max_bytes`` when those are set.
- Time comes only from the injected `timer`, so tests are exact and instant.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError


class Policy(ABC):
    """Base class: capacity bookkeeping shared by every policy."""

    def __init__(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock = monotonic_clock
    ) -> None:
        # An int is required, not just `> 0`: a NaN bound compares False to everything (a silently unbounded
        # cache), and a str raised a bare TypeError.
        for name, bound in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0):
                raise ConfigError(f"`{name}` must be an int > 0 or None, got {bound!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.timer = timer
        self.total_bytes = 0

    @abstractmethod
    def insert(self, key: str, size: int, cost: float = 1.0) -> list[str]:
        """Admit or update `key`; return the keys evicted (possibly `key` itself), in eviction order."""

    @abstractmethod
    def access(self, key: str) -> None:
        """Record a hit on `key`."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Forget `key`."""

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    def over_capacity(self) -> bool:
        return (self.max_entries is not None and len(self) > self.max_entries) or (
            self.max_bytes is not None and self.total_bytes > self.max_bytes
        )

    def full_for(self, size: int) -> bool:
        """Whether one more entry of `size` bytes would break a capacity."""
        return (self.max_entries is not None and len(self) >= self.max_entries) or (
            self.max_bytes is not None and self.total_bytes + size > self.max_bytes
        )

    def fits(self, size: int) -> bool:
        """Whether one entry of `size` bytes can ever fit."""
        return self.max_bytes is None or size <= self.max_bytes
