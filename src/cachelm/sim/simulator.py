"""Replay a trace through a real policy and measure what it saved.

`simulate(trace, policy)` drives the policy exactly as `BoundedStore` does: a request whose key the policy
tracks is a hit (``policy.access``; unless the policy drops it on that access, as `TTLPolicy` does with an
expired key), any other is a miss and is inserted (``policy.insert``). The policy's
timer should be the simulation clock (`SimClock`) so TTLs follow trace time. Reported:

- hit ratio: hits / requests;
- byte hit ratio: bytes served from cache / bytes requested;
- saved compute (cost hit ratio): recompute cost of the hits / recompute cost of all requests — the share
  of money (response traces) or prefill compute (KV traces) the cache saved. This is the target metric.

Prefix chains (`Request.chain`): after the first miss in a chain, later requests of the same chain are
counted as misses even when the policy still tracks their key (a prefix cache cannot use a block whose parent
was recomputed); they are re-inserted, as an engine would write the recomputed blocks back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachelm.clock import ManualClock
from cachelm.policy.base import Policy
from cachelm.sim.trace import Trace


class SimClock(ManualClock):
    """A manual clock the simulator moves to each request's `time`."""

    def set(self, now: float) -> None:
        if now > self.now:
            self.now = now


@dataclass(frozen=True, kw_only=True)
class SimResult:
    policy: str
    trace: str
    capacity_bytes: int | None
    requests: int
    hits: int
    bytes_requested: int
    bytes_hit: int
    cost_requested: float
    cost_saved: float
    evictions: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def saved_compute(self) -> float:
        """Cost-weighted hit ratio: the share of recompute cost the cache avoided."""
        return self.cost_saved / self.cost_requested if self.cost_requested else 0.0


def simulate(trace: Trace, policy: Policy, *, name: str = "", clock: SimClock | None = None) -> SimResult:
    """Replay `trace` through `policy` (fresh, empty); see the module docstring."""
    hits = bytes_requested = bytes_hit = evictions = 0
    cost_requested = cost_saved = 0.0
    broken_chain = -2  # the chain whose prefix already missed
    contains, access, insert = policy.__contains__, policy.access, policy.insert
    for r in trace.requests:
        if clock is not None:
            clock.set(r.time)
        bytes_requested += r.size
        cost_requested += r.cost
        if r.chain != broken_chain and contains(r.key):
            access(r.key)
            if contains(r.key):  # still tracked after the hit (a TTL may collect an expired key on access)
                hits += 1
                bytes_hit += r.size
                cost_saved += r.cost
                continue
        if r.chain >= 0:
            broken_chain = r.chain
        if contains(r.key):
            access(r.key)  # recomputed behind a missing parent, but the block was still wanted
        else:
            evictions += len(insert(r.key, r.size, r.cost))
    return SimResult(
        policy=name or type(policy).__name__,
        trace=trace.name,
        capacity_bytes=policy.max_bytes,
        requests=len(trace),
        hits=hits,
        bytes_requested=bytes_requested,
        bytes_hit=bytes_hit,
        cost_requested=cost_requested,
        cost_saved=cost_saved,
        evictions=evictions,
    )


PolicyFactory = Callable[[int, SimClock], Policy]


def compare(trace: Trace, factories: dict[str, PolicyFactory], capacities: list[int]) -> list[SimResult]:
    """Every policy of `factories` at every byte capacity, each on a fresh policy and clock."""
    results = []
    for capacity in capacities:
        for name, factory in factories.items():
            clock = SimClock(trace.requests[0].time)
            results.append(simulate(trace, factory(capacity, clock), name=name, clock=clock))
    return results
