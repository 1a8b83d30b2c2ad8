r"""A learned, cost-aware eviction policy: two cost-aware experts, chosen online by miniature simulation.

**What is learned per key.** Expected future use is estimated by an exponentially decayed request count,
LRFU's CRF (Lee et al., IEEE Trans. Computers 2001), updated on every request of `k` (insert or hit):

.. math::

    C(k) \leftarrow C(k) \cdot 2^{-(t - t_k)/h} + 1, \qquad h = 256\,N

where `t` counts requests, :math:`t_k` is k's previous request and N the cache size in entries. The count
survives eviction in a bounded history (`history_factor` × N keys), so a popular key that was evicted returns
with its popularity (LFU and GDSF restart it at 1). With :math:`c_k` the recompute cost and :math:`s_k` the
size, :math:`C(k)\,c_k/s_k` is the expected saved cost per byte of keeping `k`: both experts rank by it.

**Experts.**

- *recency* — GreedyDual with remembered frequency: :math:`H_R(k) = L + C(k)\,c_k/s_k` set when `k` is
  requested; `L` rises to the lowest :math:`H_R` at every eviction, so keys not requested lately age (GDSF's
  inflation). Good when reuse is local in time (a session's next turn reuses its prompt's KV blocks).
- *frequency* — cost-aware LRFU: :math:`\log_2(C(k)\,c_k/s_k) + t_k/h`. Between requests all counts decay
  by the same factor, so this time-invariant key orders keys by their *current* decayed value. Good when
  popularity is stable (the same prompts asked by many users).

Each expert keeps a lazy-deletion min-heap of its priorities.

**Learning which expert to follow: miniature simulation** (Waldspurger et al., "Cache modeling and
optimization using miniature simulations", USENIX ATC 2017). The policy runs one miniature cache per expert:
a single-expert copy of itself with `sample_rate` of the capacity, fed only the requests whose key hashes
(CRC-32, so runs reproduce) into a `sample_rate` share of the key space. Spatial sampling keeps each key's
whole request stream, so a miniature of capacity r·B sees about what the full cache of capacity B sees.
Each miniature scores the recompute cost of its hits, decayed by :math:`1 - 1/(w\,N_r)` per sampled request
(:math:`N_r` the miniature's size in entries, `w` = `window_factor`): a running estimate of the saved compute
each expert would achieve now, on this traffic. Every eviction follows the expert with the higher score.

An earlier version learned the choice LeCaR-style (Vietri et al., HotStorage 2018: multiplicative weights
penalised when an expert's victim returned, with EXP3 importance weights). Its regret signal was too sparse
and noisy on the chat-derived traces: it followed the worse expert at 4–33% of evictions and lost to the
better expert alone by up to 0.006 saved compute; a higher learning rate made it worse. The miniatures
measure the quantity being optimised directly, for both experts on every sampled request (full
information, no exploration needed).

**N** is `max_entries` when set; with only a byte bound it is learned as the entry count at the first
eviction, or at the first `peek_victims` that foresees one (the frequency heap is rebuilt once then, as `h`
changes from "no decay" to 256 N).

Complexity: insert, access and evict are O(log n) amortised (two lazy heaps), peeking at the k next victims
O(k log n); remove is O(1); the count history is a bounded FIFO dict, O(1) per operation. A sampled request
(`sample_rate` of them) also costs one operation in each miniature, O(log n) on a cache `sample_rate` as
large. Memory: about 120 bytes per remembered key, plus the miniatures (`sample_rate` × 2 of that).

Tenant and semantic-cluster features are not used: a prior that started a new key's count at its tenant's
(or its conversation's) reuse ratio was measured on the chat traces and did not help (docs/BENCHMARKS.md,
section policy_sim).
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy._common import EvictingPolicy, Room, VictimPeek, check_key
from cachelm.policy.gdsf import LazyHeap

RECENCY, FREQUENCY = 0, 1
HALF_LIFE_FACTOR = 256.0  # h = 256 N
_TINY = 1e-300  # log2 of a zero density
_HASH_SPACE = 1 << 16  # sampling resolution: a key is sampled when crc32(key) mod 2^16 < rate * 2^16
_HASH_MASK = _HASH_SPACE - 1


@dataclass(slots=True)
class _Stats:
    """A key's decayed request count as of `last`, its last request; whether the miniatures sample it."""

    count: float
    last: int
    sampled: bool = False


class _CostLRFU(EvictingPolicy, VictimPeek):
    """Decayed counts plus the heaps of `experts`; evicts with `self.expert`'s heap.

    With one expert it is a single-expert cache: the miniatures `AdaptiveCostPolicy` learns from.
    """

    def __init__(
        self,
        *,
        max_entries: int | None,
        max_bytes: int | None,
        timer: Clock,
        experts: tuple[int, ...],
        history_factor: int,
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        if isinstance(history_factor, bool) or not isinstance(history_factor, int) or history_factor < 1:
            raise ConfigError(f"`history_factor` must be an int >= 1, got {history_factor!r}")
        self.history_factor = history_factor
        self.expert = experts[0]
        self._recency = LazyHeap() if RECENCY in experts else None
        self._frequency = LazyHeap() if FREQUENCY in experts else None
        self._sizes: dict[str, int] = {}
        self._costs: dict[str, float] = {}
        self._stats: dict[str, _Stats] = {}
        self._counts_history: OrderedDict[str, _Stats] = OrderedDict()  # evicted keys' counts
        self._horizon = max_entries or 0  # N; 0 until known
        self._rate = self._decay_rate()
        self._inflation = 0.0  # L of the recency expert
        self._time = 0
        self._threshold = 0  # keys with crc32 mod 2^16 below it are sampled; 0: none

    def _heap(self, expert: int) -> LazyHeap:
        heap = self._recency if expert == RECENCY else self._frequency
        assert heap is not None, "an expert this cache does not run"
        return heap

    # -- scoring ------------------------------------------------------------------------------------------
    def _decay_rate(self) -> float:
        """1 / h (0: no decay, before N is known)."""
        return 1.0 / (HALF_LIFE_FACTOR * self._horizon) if self._horizon else 0.0

    def _density(self, key: str, stats: _Stats) -> float:
        return stats.count * self._costs[key] / max(self._sizes[key], 1)

    def _push(self, key: str, stats: _Stats) -> None:
        value = stats.count * self._costs[key] / max(self._sizes[key], 1)  # _density, inlined: hot path
        if self._recency is not None:
            self._recency.push(key, self._inflation + value)
        if self._frequency is not None:
            self._frequency.push(key, math.log2(max(value, _TINY)) + stats.last * self._rate)

    def _touch(self, key: str) -> None:
        self._time += 1
        stats = self._stats.get(key)
        if stats is None:
            stats = self._counts_history.pop(key, None)
            if stats is None:
                # The sampling hash is computed once per remembered key, not on every hit: hot path.
                sampled = bool(self._threshold) and zlib.crc32(key.encode()) & _HASH_MASK < self._threshold
                stats = _Stats(count=0.0, last=self._time, sampled=sampled)
            self._stats[key] = stats
        stats.count = stats.count * math.exp2(-self._rate * (self._time - stats.last)) + 1.0
        stats.last = self._time
        self._push(key, stats)
        if stats.sampled:
            self._simulate(key, self._sizes[key], self._costs[key])

    def _simulate(self, key: str, size: int, cost: float) -> None:
        """Replay a sampled request through the miniatures (`AdaptiveCostPolicy`; miniatures sample none)."""

    def _learn_horizon(self) -> None:
        """First eviction under a byte bound: N is now known; re-key the frequency heap with the real h."""
        self._horizon = max(len(self._sizes), 1)
        self._rate = self._decay_rate()
        heap = self._frequency
        if heap is None:
            return
        heap.live.clear()
        heap.heap.clear()
        for key, stats in self._stats.items():
            heap.push(key, math.log2(max(self._density(key, stats), _TINY)) + stats.last * self._rate)

    # -- policy hooks -------------------------------------------------------------------------------------
    def _add(self, key: str, size: int, cost: float) -> None:
        self._sizes[key] = size
        self._costs[key] = cost
        self.total_bytes += size
        self._touch(key)

    def _update(self, key: str, size: int, cost: float) -> None:
        self.total_bytes += size - self._sizes[key]
        self._sizes[key] = size
        self._costs[key] = cost
        self._touch(key)

    def _evict(self) -> str:
        if not self._horizon:
            self._learn_horizon()
        if self._recency is not None:
            lowest = self._recency.peek()
            if lowest is not None:
                self._inflation = max(self._inflation, lowest[0])  # GreedyDual: L = the lowest H at eviction
        _, victim = self._heap(self.expert).pop()
        for heap in (self._recency, self._frequency):
            if heap is not None:
                heap.discard(victim)
        self._counts_history[victim] = self._stats.pop(victim)
        while len(self._counts_history) > self.history_factor * self._horizon:
            self._counts_history.popitem(last=False)
        del self._costs[victim]
        self.total_bytes -= self._sizes.pop(victim)
        return victim

    def peek_victim(self) -> str | None:
        """The key the followed expert would evict next."""
        top = self._heap(self.expert).peek()
        return None if top is None else top[1]

    def peek_victims(self, size: int) -> list[tuple[str, int]]:
        """The keys the followed expert would evict to make room for a new key of `size` bytes.

        The expert cannot change before those evictions (it is chosen in `_touch`, which runs after them), and
        an eviction moves no other key in the expert's heap, so the heap's order is the eviction order — once
        N is known: the first eviction re-keys the frequency heap, so a peek that foresees it learns N first.
        """
        room = Room(self, size)
        if room.short() and not self._horizon:
            self._learn_horizon()
        self._heap(self.expert).visit_lowest(lambda key: room.take(key, self._sizes[key]))
        return room.victims

    def expected_uses(self, key: str) -> float | None:
        """`key`'s decayed request count C(k) now (None when never seen or forgotten)."""
        stats = self._stats.get(key) or self._counts_history.get(key)
        if stats is None:
            return None
        return stats.count * math.exp2(-self._rate * (self._time - stats.last))

    # -- public API ---------------------------------------------------------------------------------------
    def access(self, key: str) -> None:
        check_key(key)
        if key in self._sizes:
            self._touch(key)

    def remove(self, key: str) -> None:
        check_key(key)
        size = self._sizes.pop(key, None)
        if size is None:
            return
        del self._costs[key]
        del self._stats[key]  # an explicit delete forgets the key's history too
        for heap in (self._recency, self._frequency):
            if heap is not None:
                heap.discard(key)
        self.total_bytes -= size

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sizes))


class AdaptiveCostPolicy(_CostLRFU):
    """Two cost-aware LRFU experts, the one to follow learned by miniature simulation; see the module
    docstring for the model."""

    def __init__(
        self,
        *,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        timer: Clock = monotonic_clock,
        sample_rate: float = 0.125,
        window_factor: float = 32.0,
        history_factor: int = 8,
    ) -> None:
        super().__init__(
            max_entries=max_entries,
            max_bytes=max_bytes,
            timer=timer,
            experts=(RECENCY, FREQUENCY),
            history_factor=history_factor,
        )
        if (
            not isinstance(sample_rate, int | float)
            or isinstance(sample_rate, bool)
            or not 0 < sample_rate <= 1
        ):
            raise ConfigError(f"`sample_rate` must be in (0, 1], got {sample_rate!r}")
        if (
            isinstance(window_factor, bool)
            or not isinstance(window_factor, int | float)
            or not window_factor >= 1  # also refuses NaN, which would make every score NaN
        ):
            raise ConfigError(f"`window_factor` must be a number >= 1, got {window_factor!r}")
        self.sample_rate = float(sample_rate)
        self.window_factor = float(window_factor)
        # Saved cost (decayed) of each expert's miniature: [recency, frequency].
        self.scores = [0.0, 0.0]
        self._score_decay = 1.0  # per sampled request; set once the miniatures know their size
        self.minis: tuple[_CostLRFU, ...] = ()
        if max_entries is not None or max_bytes is not None:
            # An unbounded cache never evicts: nothing to choose, so no miniatures.
            self.minis = tuple(
                _CostLRFU(
                    max_entries=None if max_entries is None else max(int(max_entries * sample_rate), 1),
                    max_bytes=None if max_bytes is None else max(int(max_bytes * sample_rate), 1),
                    timer=timer,
                    experts=(expert,),
                    history_factor=history_factor,
                )
                for expert in (RECENCY, FREQUENCY)
            )
            self._threshold = round(sample_rate * _HASH_SPACE)

    def _simulate(self, key: str, size: int, cost: float) -> None:
        """Replay one sampled request through the miniatures; score their hits."""
        decay, scores = self._score_decay, self.scores
        for expert, mini in enumerate(self.minis):
            scores[expert] *= decay
            if key in mini:
                mini.access(key)
                scores[expert] += cost
            else:
                mini.insert(key, size, cost)
        if decay == 1.0 and self.minis[0]._horizon:
            self._score_decay = 1.0 - 1.0 / (self.window_factor * self.minis[0]._horizon)
        # Ties (both zero at the start) go to recency, as an empty history gives frequency nothing to use.
        self.expert = RECENCY if scores[RECENCY] >= scores[FREQUENCY] else FREQUENCY
