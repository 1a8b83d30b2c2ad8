"""TinyLFU admission in front of any policy, for large values (KV blocks, long answers).

`TinyLFUPolicy(inner)` counts every request (inserts are misses, accesses are hits) in a `FrequencySketch`
(count-min with aging + doorkeeper). A new key is always admitted when it is below `large_bytes` or when
the inner policy has room for it without evicting. Otherwise it must earn its place:

- when the inner policy can name its next victim (`VictimPeek`: LRU, LFU, GDSF, the adaptive policy), the
  candidate is admitted only if its estimated frequency is higher than the victim's — TinyLFU's rule;
- otherwise (e.g. S3-FIFO, whose eviction moves keys between queues) only if its estimate is at least
  `min_frequency` (2: seen before within the sketch's memory).

A refused key comes back as ``[key]`` and is not tracked (the `Policy` contract). Updates of tracked keys and
hits are passed through. This is TinyLFU's admission rule without W-TinyLFU's window LRU: small values
bypassing the filter play the window's part for cheap entries, and the doorkeeper keeps one-hit wonders out of
the counters. Overhead: O(sketch depth) on top of the inner policy's own cost.
"""

from __future__ import annotations

from collections.abc import Iterator

from cachelm.errors import ConfigError
from cachelm.policy._common import VictimPeek, check_entry, check_key
from cachelm.policy.base import Policy
from cachelm.policy.sketch import FrequencySketch


class TinyLFUPolicy(Policy):
    """A TinyLFU admission filter wrapping `inner`; see the module docstring."""

    def __init__(
        self,
        inner: Policy,
        *,
        sketch: FrequencySketch | None = None,
        large_bytes: int = 0,
        min_frequency: int = 2,
    ) -> None:
        if not isinstance(inner, Policy):
            raise ConfigError(f"`inner` must be a Policy, got {type(inner).__name__}")
        if len(inner):
            raise ConfigError(f"`inner` must be empty, it tracks {len(inner)} keys")
        if isinstance(large_bytes, bool) or not isinstance(large_bytes, int) or large_bytes < 0:
            raise ConfigError(f"`large_bytes` must be an int >= 0, got {large_bytes!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"`min_frequency` must be an int >= 1, got {min_frequency!r}")
        super().__init__(max_entries=inner.max_entries, max_bytes=inner.max_bytes, timer=inner.timer)
        self.inner = inner
        if sketch is None:
            width = 8 * inner.max_entries if inner.max_entries is not None else 8192
            sketch = FrequencySketch(width=max(width, 1024))
        self.sketch = sketch
        self.large_bytes = large_bytes
        self.min_frequency = min_frequency
        self.rejected = 0

    def _needs_eviction(self, size: int) -> bool:
        inner = self.inner
        return (inner.max_entries is not None and len(inner) >= inner.max_entries) or (
            inner.max_bytes is not None and inner.total_bytes + size > inner.max_bytes
        )

    def admits(self, key: str, size: int) -> bool:
        """Whether a new `key` of `size` bytes would be admitted now (the request already recorded)."""
        if size < self.large_bytes or not self._needs_eviction(size):
            return True
        candidate = self.sketch.estimate(key)
        if isinstance(self.inner, VictimPeek):
            victim = self.inner.peek_victim()
            return victim is None or candidate > self.sketch.estimate(victim)
        return candidate >= self.min_frequency

    def insert(self, key: str, size: int, cost: float = 1.0) -> list[str]:
        check_entry(key, size, cost)
        self.sketch.record(key)
        if key not in self.inner and self.inner.fits(size) and not self.admits(key, size):
            self.rejected += 1
            return [key]
        evicted = self.inner.insert(key, size, cost)
        self.total_bytes = self.inner.total_bytes
        return evicted

    def access(self, key: str) -> None:
        check_key(key)
        if key in self.inner:
            self.sketch.record(key)
            self.inner.access(key)

    def remove(self, key: str) -> None:
        check_key(key)
        self.inner.remove(key)
        self.total_bytes = self.inner.total_bytes

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)
