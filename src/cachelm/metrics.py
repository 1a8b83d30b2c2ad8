"""Cache metrics: hits, misses, errors, latencies, tokens and cost saved, bytes written and stored.

`CacheMetrics` keeps Prometheus collectors in its *own* `CollectorRegistry` (never the process-global one),
so several caches, tests and servers can live in one process without name clashes. The server exposes
`exposition()` on ``/metrics``; `snapshot()` gives the same numbers as a dict for dashboards and the CLI.

Latency quantiles: Prometheus histograms only give bucketed estimates, so each latency series also keeps a
bounded window of its most recent observations (``window`` per series, default 4,096) from which
`snapshot()` computes exact nearest-rank P50/P95/P99 *over that window*.

Cost saved: a hit saves the upstream call that produced the cached answer; its ``usage`` (prompt and
completion tokens) times the model's price gives the estimate. Prices are USD per 1M tokens, looked up by
exact model id and then by longest prefix (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``); a model with no
price still counts its tokens, at zero cost.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cachelm.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Price:
    """USD per one million tokens."""

    input: float
    output: float

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"`{name}` price must be a finite number >= 0, got {value!r}")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


# Public list prices (USD per 1M tokens, standard tier) when this table was written; override per deployment.
DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o": Price(input=2.50, output=10.00),
    "gpt-4o-mini": Price(input=0.15, output=0.60),
    "gpt-4.1": Price(input=2.00, output=8.00),
    "gpt-4.1-mini": Price(input=0.40, output=1.60),
    "gpt-4.1-nano": Price(input=0.10, output=0.40),
    "gpt-3.5-turbo": Price(input=0.50, output=1.50),
    "o3-mini": Price(input=1.10, output=4.40),
    "text-embedding-3-small": Price(input=0.02, output=0.0),
    "text-embedding-3-large": Price(input=0.13, output=0.0),
}

# Seconds; spans an in-process hit (~10 µs) to a slow upstream generation (~1 min).
LATENCY_BUCKETS = (
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

ALL_TENANTS = "*"  # the tenant label value when per-tenant labels are off
MAX_PRICED_MODELS = 4096  # model ids whose resolved price is remembered (cleared when full)


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 < q <= 1) of an ascending list: an observed value, never a blend."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class _Window:
    """The last `size` observations of one latency series. Appends are O(1)."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.values.append(value)
        self.count += 1
        self.total += value

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.values)
        return {
            "count": self.count,
            "mean_ms": 1000 * self.total / self.count if self.count else math.nan,
            "p50_ms": 1000 * nearest_rank(ordered, 0.50),
            "p95_ms": 1000 * nearest_rank(ordered, 0.95),
            "p99_ms": 1000 * nearest_rank(ordered, 0.99),
        }


class CacheMetrics:
    """Counters and histograms of one cache (or one server). Thread-safe."""

    def __init__(
        self,
        *,
        prices: Mapping[str, Price] | None = None,
        tenant_labels: bool = False,
        window: int = 4096,
        namespace: str = "cachelm",
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"`window` must be an int >= 1, got {window!r}")
        if prices is not None and not all(isinstance(p, Price) for p in prices.values()):
            raise ConfigError("`prices` values must be `Price` objects")
        # A key is a model id or prefix: "" would be a prefix of every id, and a non-string would make
        # `price` raise on the serving path.
        if prices is not None and not all(isinstance(m, str) and m for m in prices):
            raise ConfigError(f"`prices` keys must be non-empty model ids, got {list(prices)!r}")
        self._prices: dict[str, Price] = dict(DEFAULT_PRICES if prices is None else prices)
        self._price_of: dict[str, Price | None] = {}  # model id → resolved price (prefix lookup is O(table))
        # Label children are cached: `labels()` validates and locks on every call, a few µs on the hit path.
        self._children: dict[tuple[str, ...], Any] = {}
        self.tenant_labels = tenant_labels
        self.registry = CollectorRegistry(auto_describe=True)
        self._window = window
        self._ns = namespace
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        r, ns = self.registry, namespace
        self._hits = Counter("hits", "Cache hits.", ["layer", "tenant"], namespace=ns, registry=r)
        self._misses = Counter("misses", "Cache misses.", ["layer", "tenant"], namespace=ns, registry=r)
        self._bypass = Counter(
            "bypass", "Requests not eligible for caching (sampled, error answer).", ["layer", "reason"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._coalesced = Counter(
            "coalesced", "Misses served by another caller's in-flight computation.", ["layer"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._errors = Counter(
            "errors", "Cache tier failures turned into misses.", ["layer", "kind"], namespace=ns, registry=r
        )
        self._lookup = Histogram(
            "lookup_seconds", "Cache lookup latency.", ["layer"], buckets=LATENCY_BUCKETS,
            namespace=ns, registry=r,
        )  # fmt: skip
        self._compute = Histogram(
            "compute_seconds", "Upstream computation latency on a miss.", ["layer"],
            buckets=LATENCY_BUCKETS, namespace=ns, registry=r,
        )  # fmt: skip
        self._tokens = Counter(
            "tokens_saved", "Tokens not sent upstream thanks to hits.", ["layer", "kind"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._cost = Counter(
            "cost_saved_usd", "Estimated upstream cost saved by hits (USD).", ["layer"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self._bytes = Counter(
            "bytes_written", "Bytes of values written to the cache.", ["layer"], namespace=ns, registry=r
        )
        self._entries = Gauge(
            "entries", "Entries in the cache when last measured.", ["layer"], namespace=ns, registry=r
        )
        self._stored = Gauge(
            "bytes_stored", "Bytes of values in the cache when last measured.", ["layer"], namespace=ns,
            registry=r,
        )  # fmt: skip

    # -- recording -------------------------------------------------------------------------------------

    def _tenant(self, tenant: str) -> str:
        return tenant if self.tenant_labels else ALL_TENANTS

    def hit(self, layer: str, *, tenant: str = "default", model: str = "", usage: Any = None) -> None:
        """Count a hit; `usage` (an OpenAI ``usage`` dict) credits the tokens and cost it saved."""
        self._child(self._hits, "hits", layer, self._tenant(tenant)).inc()
        if isinstance(usage, Mapping):
            self.saved(layer, model=model, usage=usage)

    def miss(self, layer: str, *, tenant: str = "default") -> None:
        self._child(self._misses, "misses", layer, self._tenant(tenant)).inc()

    def bypass(self, layer: str, reason: str) -> None:
        self._bypass.labels(layer, reason).inc()

    def coalesced(self, layer: str) -> None:
        self._coalesced.labels(layer).inc()

    def error(self, layer: str, kind: str = "backend") -> None:
        self._errors.labels(layer, kind).inc()

    def observe_lookup(self, layer: str, seconds: float) -> None:
        self._child(self._lookup, "lookup", layer).observe(seconds)
        self._series("lookup", layer).add(seconds)

    def observe_compute(self, layer: str, seconds: float) -> None:
        self._compute.labels(layer).observe(seconds)
        self._series("compute", layer).add(seconds)

    def bytes_written(self, layer: str, num_bytes: int) -> None:
        self._bytes.labels(layer).inc(num_bytes)

    def set_size(self, layer: str, *, entries: int, num_bytes: int) -> None:
        """Record a measurement of the cache's size (entries and bytes of values currently stored)."""
        self._entries.labels(layer).set(entries)
        self._stored.labels(layer).set(num_bytes)

    def saved(self, layer: str, *, model: str, usage: Mapping[str, Any]) -> None:
        """Credit the tokens of `usage` (prompt/completion or input/output) and their estimated cost."""
        input_tokens = _int(usage.get("prompt_tokens", usage.get("input_tokens", 0)))
        output_tokens = _int(usage.get("completion_tokens", usage.get("output_tokens", 0)))
        self._child(self._tokens, "tokens", layer, "input").inc(input_tokens)
        self._child(self._tokens, "tokens", layer, "output").inc(output_tokens)
        price = self.price(model)
        if price is not None:
            self._child(self._cost, "cost", layer).inc(price.cost(input_tokens, output_tokens))

    @property
    def prices(self) -> Mapping[str, Price]:
        """The price table (USD per 1M tokens by model id or prefix); change it with `set_price`."""
        return MappingProxyType(self._prices)

    def set_price(self, model: str, price: Price) -> None:
        """Add or replace the price of `model` (an id or an id prefix)."""
        if not isinstance(model, str) or not model:
            raise ConfigError(f"`model` must be a non-empty string, got {model!r}")
        if not isinstance(price, Price):
            raise ConfigError(f"`price` must be a Price, got {type(price).__name__}")
        self._prices[model] = price
        self._price_of.clear()

    def price(self, model: str) -> Price | None:
        """The price of `model`: exact id first, then the longest known prefix; None when unknown."""
        if model in self._price_of:
            return self._price_of[model]
        best = (
            model
            if model in self._prices
            else max((m for m in self._prices if model.startswith(m)), key=len, default=None)
        )
        found = None if best is None else self._prices[best]
        if len(self._price_of) >= MAX_PRICED_MODELS:  # model ids come from requests: keep the memo bounded
            self._price_of.clear()
        self._price_of[model] = found
        return found

    def _child(self, metric: Any, name: str, *labels: str) -> Any:
        child = self._children.get((name, *labels))
        if child is None:
            child = self._children[(name, *labels)] = metric.labels(*labels)
        return child

    def _series(self, kind: str, layer: str) -> _Window:
        with self._lock:
            series = self._windows.get((kind, layer))
            if series is None:
                series = self._windows[(kind, layer)] = _Window(self._window)
            return series

    # -- reading ---------------------------------------------------------------------------------------

    def _values(self, name: str) -> dict[tuple[str, ...], float]:
        """Values of counter or gauge `name` (``"hits"``…), keyed by label values in declaration order."""
        out: dict[tuple[str, ...], float] = {}
        for family in self.registry.collect():
            if family.name == f"{self._ns}_{name}":
                for sample in family.samples:
                    if family.type == "gauge" or sample.name.endswith("_total"):
                        out[tuple(sample.labels.values())] = sample.value
        return out

    def count(self, name: str, **labels: str) -> float:
        """The sum of counter `name` (``"hits"``, ``"misses"``…) over the samples matching `labels`."""
        total = 0.0
        for family in self.registry.collect():
            if family.name == f"{self._ns}_{name}":
                for sample in family.samples:
                    if sample.name.endswith("_total") and all(
                        sample.labels.get(k) == v for k, v in labels.items()
                    ):
                        total += sample.value
        return total

    def snapshot(self) -> dict[str, Any]:
        """All counters as plain numbers, per layer, with hit rates and exact windowed latency quantiles."""
        layers: dict[str, dict[str, Any]] = {}

        def layer(name: str) -> dict[str, Any]:
            return layers.setdefault(name, {"hits": 0, "misses": 0, "coalesced": 0, "errors": 0})

        for (name, _tenant), v in self._values("hits").items():
            layer(name)["hits"] += int(v)
        for (name, _tenant), v in self._values("misses").items():
            layer(name)["misses"] += int(v)
        for (name,), v in self._values("coalesced").items():
            layer(name)["coalesced"] += int(v)
        for (name, _kind), v in self._values("errors").items():
            layer(name)["errors"] += int(v)
        for (name, reason), v in self._values("bypass").items():
            layer(name).setdefault("bypass", {})[reason] = int(v)
        for (name, kind), v in self._values("tokens_saved").items():
            layer(name).setdefault("tokens_saved", {})[kind] = int(v)
        for (name,), v in self._values("cost_saved_usd").items():
            layer(name)["cost_saved_usd"] = v
        for (name,), v in self._values("bytes_written").items():
            layer(name)["bytes_written"] = int(v)
        for (name,), v in self._values("entries").items():
            layer(name)["entries"] = int(v)
        for (name,), v in self._values("bytes_stored").items():
            layer(name)["bytes_stored"] = int(v)
        with self._lock:
            windows = dict(self._windows)
        for (kind, name), series in windows.items():
            layer(name)[f"{kind}_latency"] = series.summary()
        for stats in layers.values():
            lookups = stats["hits"] + stats["misses"]
            stats["hit_rate"] = stats["hits"] / lookups if lookups else 0.0
        totals = {
            "hits": sum(s["hits"] for s in layers.values()),
            "misses": sum(s["misses"] for s in layers.values()),
            "errors": sum(s["errors"] for s in layers.values()),
            "tokens_saved": sum(sum(s.get("tokens_saved", {}).values()) for s in layers.values()),
            "cost_saved_usd": sum(s.get("cost_saved_usd", 0.0) for s in layers.values()),
        }
        return {"layers": layers, "totals": totals}

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
