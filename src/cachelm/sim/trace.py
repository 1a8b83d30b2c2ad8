"""Requests and traces: what the simulator replays.

A `Request` is one cache lookup: a key, the bytes its entry occupies, and what recomputing it costs (USD for
response traces, GFLOP of prefill for KV-block traces; the unit is the trace's). Requests sharing a
`chain` (a prompt's KV blocks, in order) are prefix lookups: once one misses, the rest of the chain misses
too, because a prefix cache cannot use a block whose parent it had to recompute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cachelm.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """One lookup in a trace. `time` is seconds since the trace began (non-decreasing within a trace)."""

    key: str
    size: int
    cost: float
    time: float = 0.0
    tenant: str = "default"
    chain: int = -1  # -1: an independent lookup; otherwise the id of the prefix chain it belongs to

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError(f"`key` must be a non-empty string, got {self.key!r}")
        if not isinstance(self.size, int) or self.size < 0:
            raise ConfigError(f"`size` must be an int >= 0, got {self.size!r}")
        if not math.isfinite(self.cost) or self.cost < 0:
            raise ConfigError(f"`cost` must be a finite number >= 0, got {self.cost!r}")


@dataclass(frozen=True, kw_only=True)
class Trace:
    """A named, documented sequence of requests."""

    name: str
    requests: Sequence[Request]
    cost_unit: str  # "USD", "GFLOP" ...
    description: str = ""
    params: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.requests:
            raise ConfigError(f"trace {self.name!r} has no requests")

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    def unique_bytes(self) -> int:
        """Bytes needed to hold every distinct key once (the working set; the last size seen per key)."""
        sizes = {r.key: r.size for r in self.requests}
        return sum(sizes.values())

    def unique_keys(self) -> int:
        return len({r.key for r in self.requests})

    def summary(self) -> dict[str, float]:
        """Requests, distinct keys, working-set bytes, and the best possible (infinite-cache) ratios."""
        seen: set[str] = set()
        hits = hit_bytes = hit_cost = 0.0
        total_bytes = total_cost = 0.0
        for r in self.requests:
            total_bytes += r.size
            total_cost += r.cost
            if r.key in seen:
                hits += 1
                hit_bytes += r.size
                hit_cost += r.cost
            seen.add(r.key)
        n = len(self.requests)
        return {
            "requests": n,
            "keys": len(seen),
            "unique_bytes": self.unique_bytes(),
            "max_hit_ratio": hits / n,
            "max_byte_hit_ratio": hit_bytes / total_bytes if total_bytes else 0.0,
            "max_cost_hit_ratio": hit_cost / total_cost if total_cost else 0.0,
        }
