"""Machinery shared by the concrete policies: argument checks and the insert template.

Every concrete policy follows one insert discipline (the one the S3-FIFO and GreedyDual papers use):

1. reject an entry that could never fit (``size > max_bytes``): ``[key]`` is returned and `key` is forgotten;
2. an already-tracked key is updated in place (new size and cost, counted as a hit), then entries are evicted
   while the policy is over capacity — the updated key itself may be among them;
3. a new key first makes room (evicting while one more entry of `size` bytes would not fit), then is added,
   so a new key is never its own victim.
"""

from __future__ import annotations

import math
from abc import abstractmethod

from cachelm.errors import ConfigError
from cachelm.policy.base import Policy


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"`key` must be a non-empty string, got {key!r}")
    return key


def check_entry(key: object, size: object, cost: object) -> float:
    """Validate `insert` arguments; return `cost` as a float."""
    check_key(key)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"`size` must be an int >= 0, got {size!r}")
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
        raise ConfigError(f"`cost` must be a finite number >= 0, got {cost!r}")
    return float(cost)


class VictimPeek:
    """Optional capability: name the next victim without evicting it (TinyLFU admission compares with it)."""

    @abstractmethod
    def peek_victim(self) -> str | None:
        """The key the next eviction would remove, or None when nothing is tracked."""


class EvictingPolicy(Policy):
    """A policy with one eviction queue discipline; subclasses provide `_add`, `_update` and `_evict`."""

    def insert(self, key: str, size: int, cost: float = 1.0) -> list[str]:
        fcost = check_entry(key, size, cost)
        if not self.fits(size):
            self.remove(key)
            return [key]
        evicted: list[str] = []
        if key in self:
            self._update(key, size, fcost)
            while self.over_capacity():
                evicted.append(self._evict())
            return evicted
        while self.full_for(size):
            evicted.append(self._evict())
        self._add(key, size, fcost)
        return evicted

    @abstractmethod
    def _add(self, key: str, size: int, cost: float) -> None:
        """Track a new key (room has been made)."""

    @abstractmethod
    def _update(self, key: str, size: int, cost: float) -> None:
        """Update a tracked key's size and cost; counts as a hit."""

    @abstractmethod
    def _evict(self) -> str:
        """Remove and return the next victim; only called while something is tracked."""
