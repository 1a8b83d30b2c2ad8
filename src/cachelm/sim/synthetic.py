"""Synthetic traces: Zipf popularity, scans, and shifting popularity.

Every key gets a size and a recompute cost once, drawn from distributions that look like LLM responses:
the answer length is log-normal (median `median_bytes`, σ = 1), the prompt length log-normal (median 400
bytes, σ = 1), tokens ≈ UTF-8 bytes / 4, and cost = prompt tokens × input price + answer tokens × output price
(`Pricing`). Size and cost are drawn independently, so cost per byte varies by more than 10× between keys —
the situation size- and cost-aware policies are for. Arrivals are Poisson at `rate` requests per second.

- `zipf_trace`: ranks 1..n_keys with P(rank k) ∝ k^-alpha, ranks shuffled over keys.
- `scan_trace`: a Zipf background interrupted every `scan_every` requests by a scan of `scan_length` keys
  never seen before (batch jobs, crawlers): one-hit wonders that pollute recency-based caches.
- `shifting_trace`: `phases` consecutive Zipf phases; each phase re-draws which keys are popular while
  keeping `overlap` of the previous hot set (trending topics), so a policy must forget old popularity.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from cachelm.errors import ConfigError
from cachelm.sim.trace import Request, Trace

BYTES_PER_TOKEN = 4  # a common rule of thumb for English BPE tokenizers


@dataclass(frozen=True, kw_only=True)
class Pricing:
    """Model prices in USD per million tokens (defaults: a small hosted chat model's list price)."""

    input_per_mtok: float = 0.15
    output_per_mtok: float = 0.60

    def cost(self, prompt_bytes: int, answer_bytes: int) -> float:
        prompt_tokens = -(-prompt_bytes // BYTES_PER_TOKEN)
        answer_tokens = -(-answer_bytes // BYTES_PER_TOKEN)
        return (prompt_tokens * self.input_per_mtok + answer_tokens * self.output_per_mtok) / 1e6


class _Catalog:
    """Per-key size and cost, drawn once per key."""

    def __init__(self, rng: random.Random, pricing: Pricing, median_bytes: int) -> None:
        self.rng, self.pricing, self.median_bytes = rng, pricing, median_bytes
        self.entries: dict[str, tuple[int, float]] = {}

    def get(self, key: str) -> tuple[int, float]:
        entry = self.entries.get(key)
        if entry is None:
            answer = max(16, int(self.rng.lognormvariate(0, 1.0) * self.median_bytes))
            prompt = max(16, int(self.rng.lognormvariate(0, 1.0) * 400))
            entry = self.entries[key] = (answer, self.pricing.cost(prompt, answer))
        return entry


def _zipf_cdf(n: int, alpha: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k**alpha) for k in range(1, n + 1)))


def _draw(rng: random.Random, cdf: list[float]) -> int:
    return bisect.bisect_left(cdf, rng.random() * cdf[-1])


def _check(n_keys: int, n_requests: int, alpha: float) -> None:
    if n_keys < 1 or n_requests < 1:
        raise ConfigError(f"`n_keys` and `n_requests` must be >= 1, got {n_keys!r}, {n_requests!r}")
    if alpha <= 0:
        raise ConfigError(f"`alpha` must be > 0, got {alpha!r}")


def _request(catalog: _Catalog, key: str, t: float) -> Request:
    size, cost = catalog.get(key)
    return Request(key=key, size=size, cost=cost, time=t)


def _start(
    seed: int, pricing: Pricing | None, median_bytes: int, names: list[str]
) -> tuple[random.Random, _Catalog]:
    """The seeded RNG and key catalog every synthetic trace starts from; shuffles `names` in place."""
    rng = random.Random(seed)
    catalog = _Catalog(rng, pricing or Pricing(), median_bytes)
    rng.shuffle(names)
    return rng, catalog


def _zipf_requests(
    rng: random.Random,
    catalog: _Catalog,
    names: list[str],
    cdf: list[float],
    *,
    rate: float,
    t: float,
    count: int,
    out: list[Request],
) -> float:
    """Append `count` Poisson arrivals of Zipf-drawn `names` after time `t`; return the last arrival time."""
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(_request(catalog, names[_draw(rng, cdf)], t))
    return t


def zipf_trace(
    *,
    n_keys: int = 20_000,
    n_requests: int = 200_000,
    alpha: float = 0.9,
    rate: float = 20.0,
    median_bytes: int = 1200,
    pricing: Pricing | None = None,
    seed: int = 0,
) -> Trace:
    _check(n_keys, n_requests, alpha)
    names = [f"z{i}" for i in range(n_keys)]
    rng, catalog = _start(seed, pricing, median_bytes, names)
    cdf = _zipf_cdf(n_keys, alpha)
    requests: list[Request] = []
    _zipf_requests(rng, catalog, names, cdf, rate=rate, t=0.0, count=n_requests, out=requests)
    return Trace(
        name="zipf",
        requests=requests,
        cost_unit="USD",
        description=f"Zipf(α={alpha}) over {n_keys:,} keys, {n_requests:,} requests",
        params={"alpha": alpha, "n_keys": n_keys, "seed": seed},
    )


def scan_trace(
    *,
    n_keys: int = 20_000,
    n_requests: int = 200_000,
    alpha: float = 0.9,
    scan_every: int = 5_000,
    scan_length: int = 2_000,
    rate: float = 20.0,
    median_bytes: int = 1200,
    pricing: Pricing | None = None,
    seed: int = 0,
) -> Trace:
    _check(n_keys, n_requests, alpha)
    names = [f"z{i}" for i in range(n_keys)]
    rng, catalog = _start(seed, pricing, median_bytes, names)
    cdf = _zipf_cdf(n_keys, alpha)
    t, scan_id = 0.0, 0
    requests: list[Request] = []
    while len(requests) < n_requests:
        t = _zipf_requests(rng, catalog, names, cdf, rate=rate, t=t, count=scan_every, out=requests)
        for _ in range(scan_length):
            t += rng.expovariate(rate)
            requests.append(_request(catalog, f"scan{scan_id}", t))
            scan_id += 1
    return Trace(
        name="scan",
        requests=requests[:n_requests],
        cost_unit="USD",
        description=f"Zipf(α={alpha}) over {n_keys:,} keys + a {scan_length:,}-key scan every {scan_every:,}",
        params={"alpha": alpha, "scan_every": scan_every, "scan_length": scan_length, "seed": seed},
    )


def shifting_trace(
    *,
    n_keys: int = 20_000,
    n_requests: int = 200_000,
    alpha: float = 0.9,
    phases: int = 5,
    overlap: float = 0.3,
    rate: float = 20.0,
    median_bytes: int = 1200,
    pricing: Pricing | None = None,
    seed: int = 0,
) -> Trace:
    _check(n_keys, n_requests, alpha)
    if phases < 1 or not 0.0 <= overlap <= 1.0:
        raise ConfigError(f"`phases` must be >= 1 and `overlap` in [0, 1], got {phases!r}, {overlap!r}")
    universe = [f"s{i}" for i in range(n_keys * phases)]
    rng, catalog = _start(seed, pricing, median_bytes, universe)
    cdf = _zipf_cdf(n_keys, alpha)
    ranking = universe[:n_keys]
    fresh = iter(universe[n_keys:])
    t = 0.0
    requests: list[Request] = []
    per_phase = n_requests // phases
    for phase in range(phases):
        if phase:
            keep = int(overlap * n_keys)
            kept = ranking[:keep]
            rng.shuffle(kept)  # survivors of the old hot set land at random new ranks
            ranking = kept + [next(fresh) for _ in range(n_keys - keep)]
            rng.shuffle(ranking)
        t = _zipf_requests(rng, catalog, ranking, cdf, rate=rate, t=t, count=per_phase, out=requests)
    return Trace(
        name="shift",
        requests=requests,
        cost_unit="USD",
        description=f"{phases} Zipf(α={alpha}) phases over {n_keys:,} keys, "
        f"{overlap:.0%} of keys kept per shift",
        params={"alpha": alpha, "phases": phases, "overlap": overlap, "seed": seed},
    )
