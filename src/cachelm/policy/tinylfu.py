"""W-TinyLFU admission in front of any policy, for large values (KV blocks, long answers).

`TinyLFUPolicy(inner)` counts every request (inserts are misses, accesses are hits) in a `FrequencySketch`
(count-min with aging + doorkeeper) and filters what enters `inner`, after Einziger, Friedman and Manes
("TinyLFU: a highly efficient cache admission policy", 2017):

- **window**: a new key first enters a small LRU window (`window_ratio` of the capacity, 1% by default, carved
  out of `inner`'s capacity), admitted unconditionally, so a burst of a new key can hit before it has a count;
- **admission**: a key the window evicts is a candidate for `inner`. It enters when `inner` has room, or when
  its estimated frequency beats that of the keys its insert would evict, averaged over the bytes they free
  (below) — when `inner` can name them (`VictimPeek.peek_victims`: LRU, LFU, GDSF, the adaptive policy);
  otherwise (S3-FIFO, whose eviction moves keys between queues) when its estimate reaches `min_frequency`.
  A refused candidate leaves the cache.
- values below `large_bytes` skip window and filter and go straight to `inner` (cheap entries need no guard).

**Admission rule with sizes.** TinyLFU compares a candidate with one victim: with equal sizes an insert
evicts exactly one key. A large value (a long answer, a big KV entry) makes `inner` evict several, and
comparing with the first alone let a key seen 3 times push out keys seen 10 times after beating a one-hit
wonder. The candidate now faces every victim ``v`` (of ``s_v`` bytes, estimate ``f_v``), and enters when

    f_candidate × Σ s_v  >  Σ f_v × s_v

— its requests per byte beat those of the bytes it displaces. With one victim this is TinyLFU's own
``f_candidate > f_victim``, so equal-size caches (KV blocks) decide exactly as before; ties go to the victims,
as in TinyLFU and Caffeine. Rules considered and not kept, each measured with `benchmarks/policy_sim.py`'s
traces on tuning seeds only (chat-response seeds 10–14; QQP, Zipf, scan and shift seed 10; the seeds the
benchmark reports were not used to choose):

- beat the *most* frequent victim: never trades a key for a rarer one, but the maximum of several
  estimates (count-min collisions only ever raise a count) is high whenever one victim still carries
  counts from a popularity that has passed, and newcomers are refused: against the first-victim rule,
  saved compute fell by up to 0.05 on the shifting-popularity trace and by up to 0.02 on chat responses
  with GDSF or the adaptive policy inside (it rose by up to 0.04 with LRU inside at 1% of the working set);
- beat the victims' *sum* (the hits lost, counting objects): stricter still, the doorkeeper's 1 and the
  collisions add up over the victims, and counters saturate at 15, so a candidate displacing 16 entries
  could never enter however popular; below the max rule in most cells;
- the candidate's frequency × its own size against the byte-weighted sum: changes the one-victim case
  (a small key could not displace a larger, rarer one) and lost at small capacities.

Against the first-victim rule, the byte-weighted mean gained up to 0.15 saved compute on the shifting
trace and 0.003–0.017 on chat responses with the adaptive policy, or GDSF from 5%, inside; it lost up to
0.02 with LRU inside at 1–5% of the working set (where LRU's recency-only victims made the max rule
better), up to 0.01 with GDSF inside at 1%, and 0.013 with the adaptive policy on Zipf at 1%.

Caffeine does not answer this for us: for weighted entries it duels one candidate with one victim at a
time (``evictFromMain``); a candidate that wins is admitted and the next victim duels the next candidate
(window entries once the promoted ones run out), the loser of each duel leaving. Here `inner` evicts by its
own order within one insert, so there is no second candidate to duel, and the candidate faces all its
victims at once. Cost: one peek of the k victims (O(k) for LRU and LFU, O(k log n) for the heaps) and k
sketch estimates, the same order as the k evictions the insert then does.

With ``window_ratio=0`` there is no window (plain TinyLFU): a new large key faces the filter at once and comes
back as ``[key]`` when refused (the `Policy` contract). Updates of tracked keys and hits pass through.

**Adaptive window** (``adapt_window=True``; W-TinyLFU's hill climber, Einziger et al., "Adaptive software
cache management", Middleware 2018, as Caffeine runs it): the hit ratio is measured over periods of the
sketch's `sample_size` requests; after each period the window moves by a step (6.25% of the capacity at
first, shrinking by 2% per period) in the same direction as before when the hit ratio did not fall, in the
other direction when it fell; the window stays within 1–90% of the capacity. Recency-heavy traffic (a
session's next turn reusing its prompt's blocks) grows the window towards LRU; frequency-heavy traffic
shrinks it towards the filter. A shrunken main space evicts its victims at once and a shrunken window
offers its oldest keys to main, so the capacities hold after every call; both come back in the eviction list.

Overhead: O(sketch depth) plus the window's O(1) on top of the inner policy's own cost, times the number of
victims for an admission; a resize, once per period, moves at most one step's worth of entries.
"""

from __future__ import annotations

from collections.abc import Iterator

from cachelm.errors import ConfigError
from cachelm.policy._common import EvictingPolicy, VictimPeek, check_entry, check_key
from cachelm.policy.base import Policy
from cachelm.policy.lru import LRUPolicy
from cachelm.policy.sketch import FrequencySketch
from cachelm.policy.ttl import TTLPolicy

HILL_STEP = 0.0625  # first step of the window, as a share of the capacity (Caffeine's)
HILL_STEP_DECAY = 0.98  # per period: the climber settles
WINDOW_RANGE = (0.01, 0.9)  # shares of the capacity the adaptive window may take


class TinyLFUPolicy(Policy):
    """A (W-)TinyLFU admission filter wrapping `inner`; see the module docstring."""

    def __init__(
        self,
        inner: Policy,
        *,
        sketch: FrequencySketch | None = None,
        window_ratio: float = 0.01,
        large_bytes: int = 0,
        min_frequency: int = 2,
        adapt_window: bool = False,
    ) -> None:
        if not isinstance(inner, Policy):
            raise ConfigError(f"`inner` must be a Policy, got {type(inner).__name__}")
        if sketch is not None and not isinstance(sketch, FrequencySketch):
            raise ConfigError(f"`sketch` must be a FrequencySketch or None, got {type(sketch).__name__}")
        if len(inner):
            raise ConfigError(f"`inner` must be empty, it tracks {len(inner)} keys")
        if window_ratio and isinstance(inner, TTLPolicy | TinyLFUPolicy):
            raise ConfigError(
                "a window needs a plain `inner` policy; wrap the TTL outside, or `window_ratio=0`"
            )
        if not isinstance(window_ratio, int | float) or not 0.0 <= window_ratio < 0.5:
            raise ConfigError(f"`window_ratio` must be in [0, 0.5), got {window_ratio!r}")
        if isinstance(large_bytes, bool) or not isinstance(large_bytes, int) or large_bytes < 0:
            raise ConfigError(f"`large_bytes` must be an int >= 0, got {large_bytes!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"`min_frequency` must be an int >= 1, got {min_frequency!r}")
        super().__init__(max_entries=inner.max_entries, max_bytes=inner.max_bytes, timer=inner.timer)
        self.inner = inner
        self.window = self._carve_window(window_ratio)
        self.sketch = sketch if sketch is not None else FrequencySketch.for_entries(inner.max_entries or 1024)
        self.large_bytes = large_bytes
        self.min_frequency = min_frequency
        self.rejected = 0
        self._window_meta: dict[str, tuple[int, float]] = {}  # size, cost of window keys, for `inner`
        self.window_ratio = float(window_ratio)
        if adapt_window and (window_ratio == 0 or not isinstance(inner, EvictingPolicy)):
            raise ConfigError(
                "`adapt_window` needs `window_ratio` > 0 and an `inner` policy that can evict on demand, "
                f"got window_ratio={window_ratio!r}, {type(inner).__name__}"
            )
        # A capacity too small (or unbounded) for a window has nothing to adapt.
        self.adapt_window = bool(adapt_window) and self.window is not None
        self._step = HILL_STEP
        self._direction = 1.0  # +1: grow the window
        self._period_hits = self._period_requests = 0
        self._last_hit_ratio: float | None = None

    def _carve_window(self, ratio: float) -> LRUPolicy | None:
        """Give the window `ratio` of the capacity, taken from `inner` so the total stays as configured."""
        entries = int(self.max_entries * ratio) if self.max_entries is not None else None
        nbytes = int(self.max_bytes * ratio) if self.max_bytes is not None else None
        if ratio == 0 or entries == 0 or nbytes == 0 or (entries is None and nbytes is None):
            return None
        if entries is not None:
            self.inner.max_entries = self.max_entries - entries  # type: ignore[operator]
        if nbytes is not None:
            self.inner.max_bytes = self.max_bytes - nbytes  # type: ignore[operator]
        return LRUPolicy(max_entries=entries, max_bytes=nbytes, timer=self.timer)

    # -- admission ----------------------------------------------------------------------------------------
    def admits(self, key: str, size: int) -> bool:
        """Whether `inner` would take a new `key` of `size` bytes now (its request already recorded)."""
        if size < self.large_bytes or not self.inner.full_for(size):
            return True
        candidate = self.sketch.estimate(key)
        if isinstance(self.inner, VictimPeek):
            # Every victim, weighted by the bytes it frees (a 0-byte entry as 1, as GDSF counts it); in
            # integers, so ties are exact and go to the victims. See the module docstring for the rule.
            displaced = freed = 0
            for victim, victim_size in self.inner.peek_victims(size):
                weight = max(victim_size, 1)
                displaced += self.sketch.estimate(victim) * weight
                freed += weight
            return candidate * freed > displaced
        return candidate >= self.min_frequency

    def _offer(self, key: str, size: int, cost: float) -> list[str]:
        """Try to move `key` into `inner`; returns what left the cache (possibly `key`)."""
        if not self.inner.fits(size) or not self.admits(key, size):
            self.rejected += 1
            return [key]
        return self.inner.insert(key, size, cost)

    # -- Policy -------------------------------------------------------------------------------------------
    def insert(self, key: str, size: int, cost: float = 1.0) -> list[str]:
        fcost = check_entry(key, size, cost)
        self.sketch.record(key)
        window = self.window
        if self.adapt_window:
            self._period_hits += key in self  # an update of a tracked key counts as a hit
            self._period_requests += 1
        if window is not None and key in window:
            evicted = self._window_insert(key, size, fcost)
        elif key in self.inner or size < self.large_bytes:
            evicted = self.inner.insert(key, size, fcost)
        elif window is not None and window.fits(size):
            evicted = self._window_insert(key, size, fcost)
        else:
            evicted = self._offer(key, size, fcost)
        if self.adapt_window and self._period_requests >= self.sketch.sample_size:
            evicted += self._climb()
        self._sync()
        return evicted

    # -- adaptive window ----------------------------------------------------------------------------------
    def _climb(self) -> list[str]:
        """End a period: step the window along the hit ratio's slope; return what the resize evicted."""
        hit_ratio = self._period_hits / self._period_requests
        if self._last_hit_ratio is not None and hit_ratio < self._last_hit_ratio:
            self._direction = -self._direction
        self._last_hit_ratio = hit_ratio
        self._period_hits = self._period_requests = 0
        low, high = WINDOW_RANGE
        ratio = min(max(self.window_ratio + self._direction * self._step, low), high)
        self._step *= HILL_STEP_DECAY
        return self._resize(ratio)

    def _resize(self, ratio: float) -> list[str]:
        """Give the window `ratio` of the capacity and `inner` the rest; return the keys that left."""
        window, inner = self.window, self.inner
        assert window is not None and isinstance(inner, EvictingPolicy)
        self.window_ratio = ratio
        if self.max_entries is not None and self.max_entries > 1:
            share = min(max(int(self.max_entries * ratio), 1), self.max_entries - 1)
            window.max_entries, inner.max_entries = share, self.max_entries - share
        if self.max_bytes is not None and self.max_bytes > 1:
            share = min(max(int(self.max_bytes * ratio), 1), self.max_bytes - 1)
            window.max_bytes, inner.max_bytes = share, self.max_bytes - share
        evicted: list[str] = []
        while len(inner) and inner.over_capacity():
            evicted.append(inner._evict())
        while len(window) and window.over_capacity():
            candidate = window._evict()
            candidate_size, candidate_cost = self._window_meta.pop(candidate)
            evicted.extend(self._offer(candidate, candidate_size, candidate_cost))
        return evicted

    def _window_insert(self, key: str, size: int, cost: float) -> list[str]:
        assert self.window is not None
        self._window_meta[key] = (size, cost)
        evicted: list[str] = []
        for candidate in self.window.insert(key, size, cost):
            candidate_size, candidate_cost = self._window_meta.pop(candidate)
            evicted.extend(self._offer(candidate, candidate_size, candidate_cost))
        return evicted

    def _sync(self) -> None:
        self.total_bytes = self.inner.total_bytes + (self.window.total_bytes if self.window else 0)

    def access(self, key: str) -> None:
        check_key(key)
        if key in self:
            self.sketch.record(key)
            if self.adapt_window:
                self._period_hits += 1
                self._period_requests += 1
            if self.window is not None and key in self.window:
                self.window.access(key)
            else:
                self.inner.access(key)

    def remove(self, key: str) -> None:
        check_key(key)
        if self.window is not None:
            self.window.remove(key)
            self._window_meta.pop(key, None)
        self.inner.remove(key)
        self._sync()

    def __contains__(self, key: object) -> bool:
        return key in self.inner or (self.window is not None and key in self.window)

    def __len__(self) -> int:
        return len(self.inner) + (len(self.window) if self.window is not None else 0)

    def __iter__(self) -> Iterator[str]:
        keys = list(self.inner)
        if self.window is not None:
            keys += list(self.window)
        return iter(keys)
