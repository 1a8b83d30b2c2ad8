r"""A learned, cost-aware eviction policy: a regret-weighted mixture of two cost-aware experts (LeCaR-style).

LeCaR (Vietri et al., HotStorage 2018) keeps two experts, LRU and LFU, and a weight for each. At each eviction
it follows expert *e* with probability :math:`w_e`; the victim's key goes into that expert's history. When a
missed key is found in the history of expert *e*, that expert made a mistake and is penalised:

.. math::

    r = d^{\,t - t_{evict}} \qquad w_e \leftarrow w_e \, e^{-\eta r} \qquad w \leftarrow w / \sum w

where `t` counts requests, :math:`d = 0.005^{1/N}` discounts old mistakes (N = cache entries) and
:math:`\eta` is the learning rate (0.45). This is multiplicative-weights online learning over the experts.

`AdaptiveCostPolicy` makes every part cost- and size-aware, so it learns saved compute, not hit count:

- **recency expert** — GreedyDual-Size: :math:`H^R_k = L^R + c_k / s_k`, refreshed on every hit; the lowest
  goes first and :math:`L^R` rises to the evicted priority (cost-weighted LRU).
- **frequency expert** — GDSF with *remembered* frequency: :math:`H^F_k = L^F + \hat f_k \, c_k / s_k` where
  :math:`\hat f_k` is the count of `k`'s requests (hits and misses) in an aged count-min sketch
  (`FrequencySketch`), so a popular key that was evicted comes back with its popularity, unlike GDSF whose
  count restarts at 1; the sketch's periodic halving forgets stale popularity (shifting traffic).
- **cost-weighted regret** — a mistake on a key costs what recomputing it costs:
  :math:`r = d^{\,t - t_{evict}} \cdot \min(c_k / \bar c, 10)` with :math:`\bar c` the running mean cost
  of misses, so evicting one expensive entry by mistake weighs like evicting many cheap ones.
- **weight floor** — weights stay in :math:`[w_{min}, 1 - w_{min}]` (0.02) so the lagging expert keeps being
  tried and the mixture can switch back when traffic shifts (LeCaR's weights can saturate).

When both experts name the same victim no history is written (neither could have done better).
The random choice uses a seeded generator, so runs are reproducible.

Complexity: each expert is a lazy-deletion heap, so insert, access and evict are O(log n) amortised plus the
sketch's O(depth); remove is O(1); histories are bounded FIFO dicts of at most N keys, O(1) per operation.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Iterator

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy._common import EvictingPolicy, VictimPeek, check_key
from cachelm.policy.gdsf import LazyHeap
from cachelm.policy.sketch import FrequencySketch

RECENCY, FREQUENCY = 0, 1
_MAX_REGRET_SCALE = 10.0


class AdaptiveCostPolicy(EvictingPolicy, VictimPeek):
    """Cost-aware LeCaR: see the module docstring for the model and its update rule."""

    def __init__(
        self,
        *,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        timer: Clock = monotonic_clock,
        learning_rate: float = 0.45,
        weight_floor: float = 0.02,
        sketch: FrequencySketch | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, timer=timer)
        if not isinstance(learning_rate, int | float) or not 0 < learning_rate <= 10:
            raise ConfigError(f"`learning_rate` must be in (0, 10], got {learning_rate!r}")
        if not isinstance(weight_floor, int | float) or not 0 <= weight_floor < 0.5:
            raise ConfigError(f"`weight_floor` must be in [0, 0.5), got {weight_floor!r}")
        self.learning_rate = float(learning_rate)
        self.weight_floor = float(weight_floor)
        self.weights = [0.5, 0.5]  # [recency, frequency]
        if sketch is None:
            width = 8 * max_entries if max_entries is not None else 8192
            sketch = FrequencySketch(width=max(width, 1024))
        self.sketch = sketch
        self._sizes: dict[str, int] = {}
        self._costs: dict[str, float] = {}
        self._heaps = (LazyHeap(), LazyHeap())
        self._inflation = [0.0, 0.0]  # L per expert
        self._history: tuple[OrderedDict[str, int], OrderedDict[str, int]] = (OrderedDict(), OrderedDict())
        self._time = 0
        self._mean_cost = 0.0
        self._misses = 0
        self._rng = random.Random(seed)

    # -- learning -----------------------------------------------------------------------------------------
    def _horizon(self) -> int:
        """N: the cache size in entries (known, or the current count when only bytes are bounded)."""
        return max(self.max_entries if self.max_entries is not None else len(self._sizes), 1)

    def _learn_from_miss(self, key: str, cost: float) -> None:
        self._misses += 1
        self._mean_cost += (cost - self._mean_cost) / min(self._misses, 1000)  # running mean, then EWMA
        discount = 0.005 ** (1.0 / self._horizon())
        scale = min(cost / self._mean_cost, _MAX_REGRET_SCALE) if self._mean_cost > 0 else 1.0
        changed = False
        for expert, history in enumerate(self._history):
            evicted_at = history.pop(key, None)
            if evicted_at is not None:
                regret = discount ** (self._time - evicted_at) * scale
                self.weights[expert] *= math.exp(-self.learning_rate * regret)
                changed = True
        if changed:
            total = sum(self.weights)
            low, high = self.weight_floor, 1.0 - self.weight_floor
            w_recency = min(max(self.weights[RECENCY] / total, low), high)
            self.weights = [w_recency, 1.0 - w_recency]

    # -- scoring ------------------------------------------------------------------------------------------
    def _touch(self, key: str) -> None:
        self._time += 1
        self.sketch.record(key)
        value_per_byte = self._costs[key] / max(self._sizes[key], 1)
        self._heaps[RECENCY].push(key, self._inflation[RECENCY] + value_per_byte)
        freq = self.sketch.estimate(key)
        self._heaps[FREQUENCY].push(key, self._inflation[FREQUENCY] + freq * value_per_byte)

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

    def _choose_expert(self) -> int:
        return RECENCY if self._rng.random() < self.weights[RECENCY] else FREQUENCY

    def _evict(self) -> str:
        expert = self._choose_expert()
        other = 1 - expert
        priority, victim = self._heaps[expert].pop()
        self._inflation[expert] = max(self._inflation[expert], priority)
        other_top = self._heaps[other].peek()
        self._heaps[other].discard(victim)
        if other_top is None or other_top[1] != victim:
            history = self._history[expert]
            history[victim] = self._time
            while len(history) > self._horizon():
                history.popitem(last=False)
        del self._costs[victim]
        self.total_bytes -= self._sizes.pop(victim)
        return victim

    def peek_victim(self) -> str | None:
        """The victim of the currently heavier expert (the likelier choice)."""
        heavier = RECENCY if self.weights[RECENCY] > self.weights[FREQUENCY] else FREQUENCY
        top = self._heaps[heavier].peek()
        return None if top is None else top[1]

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
        for heap in self._heaps:
            heap.discard(key)
        for history in self._history:
            history.pop(key, None)
        self.total_bytes -= size

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sizes))
