"""Frequency sketches for admission and learned eviction: a count-min sketch with aging, and a doorkeeper.

`FrequencySketch` is TinyLFU's (Einziger, Friedman and Manes, "TinyLFU: a highly efficient cache admission
policy", 2017): a count-min sketch of `depth` rows whose counters saturate at `max_count` (15: 4 bits in the
paper), plus a doorkeeper Bloom filter that absorbs each key's first occurrence, so one-hit wonders never
reach the counters.
After `sample_size` increments every counter is halved and the doorkeeper cleared (a reset): estimates track
recent popularity. ``estimate(key)`` = min over rows + 1 if the doorkeeper holds the key.

Hashing uses CRC-32 with two seeds and double hashing (index_i = h1 + i·h2), not Python's `hash`, so results
are identical across processes (benchmarks reproduce). `record` and `estimate` are O(depth); a reset is
O(width·depth) once every `sample_size` records, O(depth) amortised.
"""

from __future__ import annotations

import zlib

from cachelm.errors import ConfigError


class FrequencySketch:
    """Count-min sketch + doorkeeper with periodic halving; see the module docstring."""

    def __init__(
        self, *, width: int = 4096, depth: int = 4, sample_size: int | None = None, max_count: int = 15
    ) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 16:
            raise ConfigError(f"`width` must be an int >= 16, got {width!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 8:
            raise ConfigError(f"`depth` must be an int in [1, 8], got {depth!r}")
        if sample_size is not None and (
            isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1
        ):
            raise ConfigError(f"`sample_size` must be an int >= 1 or None, got {sample_size!r}")
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ConfigError(f"`max_count` must be an int >= 1, got {max_count!r}")
        self.max_count = max_count
        self.width = 1 << (width - 1).bit_length()  # a power of two: masking instead of modulo
        self.depth = depth
        self.sample_size = sample_size if sample_size is not None else 10 * self.width
        self._mask = self.width - 1
        self._rows = [[0] * self.width for _ in range(depth)]
        self._door = bytearray(self.width * 2)  # one byte per slot: simpler than bit twiddling, still small
        self._door_mask = self.width * 2 - 1
        self.additions = 0
        self.resets = 0

    @classmethod
    def for_entries(cls, entries: int, **kwargs: int) -> FrequencySketch:
        """A sketch for a cache of about `entries` entries, sized as Caffeine sizes its own: 4 counters per
        entry per row and a reset every 10 × `entries` records. A longer sample lets old popularity saturate
        the counters, and TinyLFU then refuses every newcomer until the next reset."""
        entries = max(int(entries), 4)
        return cls(width=4 * entries, sample_size=10 * entries, **kwargs)

    def _hashes(self, key: str) -> tuple[int, int]:
        data = key.encode()
        return zlib.crc32(data), zlib.crc32(data, 0x9E3779B9) | 1

    def _in_door(self, h1: int, h2: int) -> bool:
        m = self._door_mask
        return bool(self._door[h1 & m] and self._door[(h1 + h2) & m])

    def record(self, key: str) -> None:
        """Count one occurrence of `key`."""
        h1, h2 = self._hashes(key)
        if not self._in_door(h1, h2):
            m = self._door_mask
            self._door[h1 & m] = 1
            self._door[(h1 + h2) & m] = 1
        else:
            mask = self._mask
            for i, row in enumerate(self._rows):
                j = (h1 + i * h2) & mask
                if row[j] < self.max_count:
                    row[j] += 1
        self.additions += 1
        if self.additions >= self.sample_size:
            self._reset()

    def estimate(self, key: str) -> int:
        """Estimated occurrences of `key` since about the last reset (never an underestimate before one)."""
        h1, h2 = self._hashes(key)
        mask = self._mask
        count = min(row[(h1 + i * h2) & mask] for i, row in enumerate(self._rows))
        return count + (1 if self._in_door(h1, h2) else 0)

    def _reset(self) -> None:
        # Halving keeps relative popularity while letting old popularity fade (TinyLFU's aging).
        for row in self._rows:
            for j, count in enumerate(row):
                if count:
                    row[j] = count >> 1
        self._door = bytearray(len(self._door))
        self.additions //= 2
        self.resets += 1
