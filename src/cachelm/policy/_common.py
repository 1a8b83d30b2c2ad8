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
from collections.abc import Iterable

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
    """Optional capability: name victims without evicting them (TinyLFU admission compares a candidate with
    every key its insert would evict)."""

    @abstractmethod
    def peek_victim(self) -> str | None:
        """The key the next eviction would remove, or None when nothing is tracked."""

    @abstractmethod
    def peek_victims(self, size: int) -> list[tuple[str, int]]:
        """(key, size) of each key that inserting a new key of `size` bytes would evict now, in eviction
        order: the keys are exactly what `insert` would return. Empty when it fits without evicting, or could
        never fit (`insert` refuses it without evicting). O(victims) steps of the policy's own eviction order,
        never a walk over the cache."""


class Room:
    """The room a new entry of `size` bytes needs in `policy`, counted down as victims are collected.

    It mirrors `EvictingPolicy.insert` (evict while `full_for(size)`) ahead of time, so a peek names exactly
    the keys an insert would evict.
    """

    __slots__ = ("entries", "nbytes", "victims")

    def __init__(self, policy: Policy, size: int) -> None:
        self.victims: list[tuple[str, int]] = []
        self.entries = self.nbytes = 0
        if not policy.fits(size):
            return  # refused without evicting anything
        if policy.max_entries is not None:
            self.entries = len(policy) - policy.max_entries + 1
        if policy.max_bytes is not None:
            self.nbytes = policy.total_bytes + size - policy.max_bytes

    def short(self) -> bool:
        """Whether more victims are needed."""
        return self.entries > 0 or self.nbytes > 0

    def take(self, key: str, size: int) -> bool:
        """Collect `key` (of `size` bytes) as the next victim while room is short; False once it is not."""
        if not self.short():
            return False
        self.victims.append((key, size))
        self.entries -= 1
        self.nbytes -= size
        return True

    def take_from(self, order: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Collect victims from (key, size) pairs in eviction order until there is room; return them."""
        for key, size in order:
            if not self.take(key, size):
                break
        return self.victims


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
