"""The policies the simulator compares, by name, each built fresh for one byte capacity and clock.

TTL only makes sense where entries go stale; here it wraps LRU with a one-hour TTL (sessions in the
chat traces last minutes, popular prompts recur for hours), so it shows what expiring popular entries costs.
TinyLFU variants use the default 1% window, `large_bytes=0` (every value goes through the filter) and a
sketch sized for the expected number of entries (capacity / mean value size), as Caffeine sizes its own;
"+TinyLFU(climb)" lets W-TinyLFU's hill climber size the window (`adapt_window=True`).
"""

from __future__ import annotations

from collections.abc import Callable

from cachelm.policy import (
    AdaptiveCostPolicy,
    FrequencySketch,
    GDSFPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    TinyLFUPolicy,
    TTLPolicy,
)
from cachelm.policy.base import Policy
from cachelm.sim.simulator import PolicyFactory, SimClock

TTL_SECONDS = 3600.0


def _sketch(capacity: int, mean_size: float) -> FrequencySketch:
    return FrequencySketch.for_entries(int(capacity / max(mean_size, 1.0)))


def policy_factories(mean_size: float) -> dict[str, PolicyFactory]:
    """Name → factory(capacity_bytes, clock), for a trace whose values average `mean_size` bytes."""

    def tiny(make: Callable[[int, SimClock], Policy]) -> PolicyFactory:
        return lambda cap, clock: TinyLFUPolicy(make(cap, clock), sketch=_sketch(cap, mean_size))

    base: dict[str, PolicyFactory] = {
        "LRU": lambda cap, clock: LRUPolicy(max_bytes=cap, timer=clock),
        "LFU": lambda cap, clock: LFUPolicy(max_bytes=cap, timer=clock),
        "S3-FIFO": lambda cap, clock: S3FIFOPolicy(max_bytes=cap, timer=clock),
        "GDSF": lambda cap, clock: GDSFPolicy(max_bytes=cap, timer=clock),
        "TTL(1h)+LRU": lambda cap, clock: TTLPolicy(
            LRUPolicy(max_bytes=cap, timer=clock), ttl=TTL_SECONDS, timer=clock
        ),
        "Adaptive": lambda cap, clock: AdaptiveCostPolicy(max_bytes=cap, timer=clock),
    }
    with_filter = {f"{name}+TinyLFU": tiny(base[name]) for name in ("LRU", "S3-FIFO", "GDSF", "Adaptive")}
    with_filter["Adaptive+TinyLFU(climb)"] = lambda cap, clock: TinyLFUPolicy(
        AdaptiveCostPolicy(max_bytes=cap, timer=clock), sketch=_sketch(cap, mean_size), adapt_window=True
    )
    return base | with_filter


BASELINES = ("LRU", "LFU", "S3-FIFO", "GDSF")
