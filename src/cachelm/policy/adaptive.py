r"""A learned, cost-aware eviction policy: a regret-weighted mixture of two cost-aware experts (LeCaR-style).

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

**Learning (LeCaR, Vietri et al., HotStorage 2018, with EXP3 importance weights).** At each eviction the
policy follows expert *e* with probability :math:`w_e` (seeded generator). When the experts disagree, the
victim is remembered in *e*'s regret history. A later miss on a remembered key means *e* was wrong:

.. math::

    r = \frac{d^{\,t - t_{evict}}}{p_e} \cdot \min(c_k / \bar c, 10), \qquad
    w_e \leftarrow w_e\, e^{-\eta r}, \qquad w \leftarrow w / \textstyle\sum w

with :math:`d = 0.005^{1/N}` (old mistakes count less), :math:`\eta = 0.45`, :math:`\bar c` the running mean
miss cost (a mistake costs what recomputing it costs) and :math:`p_e` the probability *e* had of being
followed when it evicted `k`: dividing by it is EXP3's importance weighting (Auer et al. 2002) — plain LeCaR
penalises the expert it follows more often simply because it records more of its mistakes, which keeps the
weights from converging. Weights are clipped to :math:`[w_{min}, 1 - w_{min}]` (`weight_floor`, 0.01) so
the lagging expert is still tried and the mixture can swing back when traffic shifts.

**N** is `max_entries` when set; with only a byte bound it is learned as the entry count at the first
eviction (the frequency heap is rebuilt once then, as `h` changes from "no decay" to 256 N).

Complexity: insert, access and evict are O(log n) amortised (two lazy heaps); remove is O(1); the count and
regret histories are bounded FIFO dicts, O(1) per operation. Memory: about 150 bytes per remembered key.
Tenant and semantic-cluster features are not used.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy._common import EvictingPolicy, VictimPeek, check_key
from cachelm.policy.gdsf import LazyHeap

RECENCY, FREQUENCY = 0, 1
HALF_LIFE_FACTOR = 256.0  # h = 256 N
_MAX_REGRET_SCALE = 10.0
_TINY = 1e-300  # log2 of a zero density


@dataclass(slots=True)
class _Stats:
    """A key's decayed request count as of `last`, its last request."""

    count: float
    last: int


class AdaptiveCostPolicy(EvictingPolicy, VictimPeek):
    """Cost-aware LeCaR over two LRFU experts: see the module docstring for the model and update rule."""

    def __init__(
        self,
        *,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        timer: Clock = monotonic_clock,
        learning_rate: float = 0.45,
        weight_floor: float = 0.01,
        history_factor: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        if not isinstance(learning_rate, int | float) or not 0 < learning_rate <= 10:
            raise ConfigError(f"`learning_rate` must be in (0, 10], got {learning_rate!r}")
        if not isinstance(weight_floor, int | float) or not 0 <= weight_floor < 0.5:
            raise ConfigError(f"`weight_floor` must be in [0, 0.5), got {weight_floor!r}")
        if isinstance(history_factor, bool) or not isinstance(history_factor, int) or history_factor < 1:
            raise ConfigError(f"`history_factor` must be an int >= 1, got {history_factor!r}")
        self.learning_rate = float(learning_rate)
        self.weight_floor = float(weight_floor)
        self.history_factor = history_factor
        self.weights = [0.5, 0.5]  # [recency, frequency]
        self._sizes: dict[str, int] = {}
        self._costs: dict[str, float] = {}
        self._stats: dict[str, _Stats] = {}
        self._counts_history: OrderedDict[str, _Stats] = OrderedDict()  # evicted keys' counts
        self._heaps = (LazyHeap(), LazyHeap())
        # key -> (time of eviction, probability the expert had of being followed then)
        self._regret: tuple[OrderedDict[str, tuple[int, float]], ...] = (OrderedDict(), OrderedDict())
        self._horizon = max_entries or 0  # N; 0 until known
        self._rate = self._decay_rate()
        self._inflation = 0.0  # L of the recency expert
        self._time = 0
        self._mean_cost = 0.0
        self._misses = 0
        self._rng = random.Random(seed)

    # -- scoring ------------------------------------------------------------------------------------------
    def _decay_rate(self) -> float:
        """1 / h (0: no decay, before N is known)."""
        return 1.0 / (HALF_LIFE_FACTOR * self._horizon) if self._horizon else 0.0

    def _density(self, key: str, stats: _Stats) -> float:
        return stats.count * self._costs[key] / max(self._sizes[key], 1)

    def _push(self, key: str, stats: _Stats) -> None:
        value = self._density(key, stats)
        self._heaps[RECENCY].push(key, self._inflation + value)
        self._heaps[FREQUENCY].push(key, math.log2(max(value, _TINY)) + stats.last * self._rate)

    def _touch(self, key: str) -> None:
        self._time += 1
        stats = self._stats.get(key)
        if stats is None:
            stats = self._counts_history.pop(key, None) or _Stats(count=0.0, last=self._time)
            self._stats[key] = stats
        stats.count = stats.count * math.exp2(-self._rate * (self._time - stats.last)) + 1.0
        stats.last = self._time
        self._push(key, stats)

    def _learn_horizon(self) -> None:
        """First eviction under a byte bound: N is now known; re-key the frequency heap with the real h."""
        self._horizon = max(len(self._sizes), 1)
        self._rate = self._decay_rate()
        heap = self._heaps[FREQUENCY]
        heap.live.clear()
        heap.heap.clear()
        for key, stats in self._stats.items():
            heap.push(key, math.log2(max(self._density(key, stats), _TINY)) + stats.last * self._rate)

    # -- learning -----------------------------------------------------------------------------------------
    def _learn_from_miss(self, key: str, cost: float) -> None:
        self._misses += 1
        self._mean_cost += (cost - self._mean_cost) / min(self._misses, 1000)  # running mean, then EWMA
        horizon = max(self._horizon, 1)
        scale = min(cost / self._mean_cost, _MAX_REGRET_SCALE) if self._mean_cost > 0 else 1.0
        changed = False
        for expert, history in enumerate(self._regret):
            entry = history.pop(key, None)
            if entry is not None:
                evicted_at, probability = entry
                # Importance-weighted (EXP3): an expert followed 90% of the time makes 9× the recorded
                # mistakes of one followed 10%; dividing by the probability compares them fairly.
                regret = 0.005 ** ((self._time - evicted_at) / horizon) * scale / probability
                self.weights[expert] *= math.exp(-self.learning_rate * regret)
                changed = True
        if changed:
            total = sum(self.weights)
            w_recency = min(max(self.weights[RECENCY] / total, self.weight_floor), 1.0 - self.weight_floor)
            self.weights = [w_recency, 1.0 - w_recency]

    # -- policy hooks -------------------------------------------------------------------------------------
    def _add(self, key: str, size: int, cost: float) -> None:
        self._learn_from_miss(key, cost)
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
        lowest = self._heaps[RECENCY].peek()
        if lowest is not None:
            self._inflation = max(self._inflation, lowest[0])  # GreedyDual: L = the lowest H at eviction
        expert = RECENCY if self._rng.random() < self.weights[RECENCY] else FREQUENCY
        _, victim = self._heaps[expert].pop()
        other = self._heaps[1 - expert]
        other_top = other.peek()
        other.discard(victim)
        bound = self.history_factor * self._horizon
        if other_top is None or other_top[1] != victim:
            regret = self._regret[expert]
            regret[victim] = (self._time, self.weights[expert])
            while len(regret) > self._horizon:
                regret.popitem(last=False)
        self._counts_history[victim] = self._stats.pop(victim)
        while len(self._counts_history) > bound:
            self._counts_history.popitem(last=False)
        del self._costs[victim]
        self.total_bytes -= self._sizes.pop(victim)
        return victim

    def peek_victim(self) -> str | None:
        """The victim of the currently heavier expert (the likelier choice)."""
        heavier = RECENCY if self.weights[RECENCY] > self.weights[FREQUENCY] else FREQUENCY
        top = self._heaps[heavier].peek()
        return None if top is None else top[1]

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
        for heap in self._heaps:
            heap.discard(key)
        for regret in self._regret:
            regret.pop(key, None)
        self.total_bytes -= size

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sizes))
