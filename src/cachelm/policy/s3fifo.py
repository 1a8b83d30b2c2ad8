"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023).

Three FIFO queues: a small queue S (10% of the capacity), a main queue M (the rest) and a ghost queue G that
holds only keys (as many entries / bytes as M may hold). Each tracked key has a 2-bit hit counter capped at 3.

- A new key goes to the head of S, or straight to M when G remembers it (it was evicted from S recently and
  came back: it is not a one-hit wonder).
- Evicting: from M when M is over its share or S is empty, otherwise from S.
- Evicting from S: the tail key moves to M if it was hit at least once (``move_to_main_threshold``), keeping
  its counter; otherwise it leaves the cache and its key enters G. Repeat until one key left the cache.
- Evicting from M: the tail key with a nonzero counter is reinserted at the head with its counter decremented
  (a CLOCK pass); the first key with a zero counter leaves the cache.

This is the paper's original variant (libCacheSim ``S3FIFOv0``: a new key always enters S). Complexity: O(1)
per insert, access and remove; eviction is amortised O(1) because every reinsertion spends one unit of a
counter that only hits can refill (at most 3 per hit).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy._common import EvictingPolicy, check_key

_MAX_FREQ = 3


class _Queue:
    """A FIFO of keys (tail = oldest = first in the dict) with its byte total."""

    __slots__ = ("bytes", "keys")

    def __init__(self) -> None:
        self.keys: OrderedDict[str, int] = OrderedDict()  # key -> size
        self.bytes = 0

    def push(self, key: str, size: int) -> None:
        self.keys[key] = size
        self.bytes += size

    def pop_tail(self) -> tuple[str, int]:
        key, size = self.keys.popitem(last=False)
        self.bytes -= size
        return key, size

    def discard(self, key: str) -> bool:
        size = self.keys.pop(key, None)
        if size is None:
            return False
        self.bytes -= size
        return True

    def __len__(self) -> int:
        return len(self.keys)


class S3FIFOPolicy(EvictingPolicy):
    """Small + main + ghost FIFO queues; see the module docstring."""

    def __init__(
        self,
        *,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        timer: Clock = monotonic_clock,
        small_ratio: float = 0.1,
        move_to_main_threshold: int = 1,
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        if (
            isinstance(small_ratio, bool)
            or not isinstance(small_ratio, int | float)
            or not 0 < small_ratio < 1
        ):
            raise ConfigError(f"`small_ratio` must be in (0, 1), got {small_ratio!r}")
        if (
            isinstance(move_to_main_threshold, bool)
            or not isinstance(move_to_main_threshold, int)
            or not 1 <= move_to_main_threshold <= _MAX_FREQ
        ):
            raise ConfigError(f"`move_to_main_threshold` must be in [1, 3], got {move_to_main_threshold!r}")
        self.small_ratio = small_ratio
        self.move_to_main_threshold = move_to_main_threshold
        self._small, self._main, self._ghost = _Queue(), _Queue(), _Queue()
        self._freq: dict[str, int] = {}

    # -- queue shares -------------------------------------------------------------------------------------
    def _over_share(self, queue: _Queue) -> bool:
        """Whether `queue` holds more than M's share (1 - `small_ratio`) of a capacity."""
        share = 1.0 - self.small_ratio
        return (self.max_entries is not None and len(queue) > share * self.max_entries) or (
            self.max_bytes is not None and queue.bytes > share * self.max_bytes
        )

    def _trim_ghost(self) -> None:
        while self._ghost.keys and self._over_share(self._ghost):
            self._ghost.pop_tail()

    def queue_of(self, key: str) -> str | None:
        """'small', 'main', 'ghost' or None: where `key` is (for tests and introspection)."""
        for name, queue in (("small", self._small), ("main", self._main), ("ghost", self._ghost)):
            if key in queue.keys:
                return name
        return None

    # -- policy hooks -------------------------------------------------------------------------------------
    def _add(self, key: str, size: int, cost: float) -> None:
        self._freq[key] = 0
        self.total_bytes += size
        if self._ghost.discard(key):
            self._main.push(key, size)
        else:
            self._small.push(key, size)

    def _update(self, key: str, size: int, cost: float) -> None:
        queue = self._small if key in self._small.keys else self._main
        old = queue.keys[key]
        queue.keys[key] = size  # in place: an update does not move a key in its FIFO
        queue.bytes += size - old
        self.total_bytes += size - old
        self._hit(key)

    def _hit(self, key: str) -> None:
        self._freq[key] = min(self._freq[key] + 1, _MAX_FREQ)

    def _evict(self) -> str:
        if self._small.keys and not self._over_share(self._main):
            victim = self._evict_small()
            if victim is not None:
                return victim
        return self._evict_main()

    def _evict_small(self) -> str | None:
        while self._small.keys:
            key, size = self._small.pop_tail()
            if self._freq[key] >= self.move_to_main_threshold:
                self._main.push(key, size)  # keeps its counter: one more CLOCK pass in M
                continue
            del self._freq[key]
            self.total_bytes -= size
            self._ghost.push(key, size)
            self._trim_ghost()
            return key
        return None  # every key of S was promoted; the caller evicts from M

    def _evict_main(self) -> str:
        main = self._main
        while True:
            key, size = main.pop_tail()
            freq = self._freq[key]
            if freq > 0:
                self._freq[key] = freq - 1
                main.push(key, size)
                continue
            del self._freq[key]
            self.total_bytes -= size
            return key

    # -- public API ---------------------------------------------------------------------------------------
    def access(self, key: str) -> None:
        check_key(key)
        if key in self._freq:
            self._hit(key)

    def remove(self, key: str) -> None:
        check_key(key)
        if self._freq.pop(key, None) is not None:
            size = self._small.keys.get(key)
            if size is None:
                size = self._main.keys[key]
                self._main.discard(key)
            else:
                self._small.discard(key)
            self.total_bytes -= size
        self._ghost.discard(key)  # an explicit delete also forgets the key's history

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def __iter__(self) -> Iterator[str]:
        """Tracked keys: S oldest first, then M oldest first (not the exact eviction order)."""
        return iter([*self._small.keys, *self._main.keys])
