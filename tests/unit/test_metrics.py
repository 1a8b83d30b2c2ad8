"""CacheMetrics: counters, exact windowed quantiles, cost estimates and Prometheus exposition."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachelm.errors import ConfigError
from cachelm.metrics import DEFAULT_PRICES, CacheMetrics, Price, nearest_rank


def test_hits_misses_errors_and_hit_rate_per_layer() -> None:
    m = CacheMetrics()
    for _ in range(3):
        m.hit("exact")
    m.miss("exact")
    m.miss("semantic")
    m.error("semantic", "backend")
    m.coalesced("exact")
    m.bypass("exact", "sampled")
    snap = m.snapshot()
    assert snap["layers"]["exact"]["hits"] == 3
    assert snap["layers"]["exact"]["misses"] == 1
    assert snap["layers"]["exact"]["hit_rate"] == 0.75
    assert snap["layers"]["exact"]["coalesced"] == 1
    assert snap["layers"]["exact"]["bypass"] == {"sampled": 1}
    assert snap["layers"]["semantic"] == {
        "hits": 0,
        "misses": 1,
        "coalesced": 0,
        "errors": 1,
        "hit_rate": 0.0,
    }
    assert snap["totals"]["hits"] == 3 and snap["totals"]["misses"] == 2 and snap["totals"]["errors"] == 1


def test_tenant_labels_are_optional() -> None:
    per_tenant = CacheMetrics(tenant_labels=True)
    per_tenant.hit("exact", tenant="acme")
    per_tenant.hit("exact", tenant="globex")
    assert per_tenant.count("hits", tenant="acme") == 1
    pooled = CacheMetrics()
    pooled.hit("exact", tenant="acme")
    assert pooled.count("hits", tenant="acme") == 0
    assert pooled.count("hits", tenant="*") == 1


def test_quantiles_are_exact_nearest_rank_over_the_window() -> None:
    m = CacheMetrics(window=1000)
    values = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1000 ms
    random.Random(0).shuffle(values)
    for v in values:
        m.observe_lookup("exact", v)
    lat = m.snapshot()["layers"]["exact"]["lookup_latency"]
    assert lat["count"] == 1000
    assert lat["p50_ms"] == pytest.approx(500.0)
    assert lat["p95_ms"] == pytest.approx(950.0)
    assert lat["p99_ms"] == pytest.approx(990.0)
    assert lat["mean_ms"] == pytest.approx(500.5)


def test_the_window_keeps_only_recent_observations() -> None:
    m = CacheMetrics(window=10)
    for _ in range(100):
        m.observe_compute("exact", 5.0)
    for _ in range(10):
        m.observe_compute("exact", 0.001)
    lat = m.snapshot()["layers"]["exact"]["compute_latency"]
    assert lat["count"] == 110  # all observations are counted ...
    assert lat["p99_ms"] == pytest.approx(1.0)  # ... but quantiles describe the last 10


def test_nearest_rank() -> None:
    assert math.isnan(nearest_rank([], 0.5))
    assert nearest_rank([1.0], 0.99) == 1.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.51) == 3.0


def test_tokens_and_cost_saved_use_the_price_table_with_prefix_lookup() -> None:
    m = CacheMetrics(prices={"my-model": Price(input=1.0, output=2.0)})
    m.hit("exact", model="my-model-2025-01", usage={"prompt_tokens": 1000, "completion_tokens": 500})
    m.hit("exact", model="unpriced", usage={"prompt_tokens": 7, "completion_tokens": 3})
    m.hit("exact", model="my-model")  # no usage: nothing credited
    snap = m.snapshot()["layers"]["exact"]
    assert snap["tokens_saved"] == {"input": 1007, "output": 503}
    assert snap["cost_saved_usd"] == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)


def test_default_prices_and_longest_prefix() -> None:
    m = CacheMetrics()
    assert m.price("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert m.price("gpt-4o-2024-08-06") == DEFAULT_PRICES["gpt-4o"]
    assert m.price("llama-3") is None


def test_exposition_is_valid_prometheus_text() -> None:
    m = CacheMetrics()
    m.hit("exact", usage={"prompt_tokens": 3, "completion_tokens": 4}, model="gpt-4o")
    m.miss("exact")
    m.observe_lookup("exact", 0.0002)
    m.bytes_written("exact", 1234)
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("cachelm_hits_total", (("layer", "exact"), ("tenant", "*")))] == 1
    assert samples[("cachelm_bytes_written_total", (("layer", "exact"),))] == 1234
    assert samples[("cachelm_lookup_seconds_count", (("layer", "exact"),))] == 1
    assert samples[("cachelm_tokens_saved_total", (("kind", "output"), ("layer", "exact")))] == 4


def test_instances_do_not_share_a_registry() -> None:
    a, b = CacheMetrics(), CacheMetrics()
    a.hit("exact")
    assert b.count("hits") == 0


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ConfigError, match="`window`"):
        CacheMetrics(window=0)
    with pytest.raises(ConfigError, match="`input`"):
        Price(input=-1.0, output=0.0)
    with pytest.raises(ConfigError, match="`prices`"):
        CacheMetrics(prices={"m": (1.0, 2.0)})  # type: ignore[dict-item]


def test_size_gauges_from_a_measured_cache() -> None:
    from cachelm.response.exact import ExactCache
    from cachelm.store.memory import MemoryStore

    cache = ExactCache(MemoryStore())
    for i in range(3):
        req = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": str(i)}]}
        cache.store(
            req, {"choices": [{"index": 0, "message": {"content": "x" * i}, "finish_reason": "stop"}]}
        )
    entries, num_bytes = cache.measure()
    assert entries == 3 and num_bytes == sum(r.size for r in cache.backend.scan())
    snap = cache.metrics.snapshot()["layers"]["exact"]
    assert (snap["entries"], snap["bytes_stored"]) == (3, num_bytes)
    assert snap["bytes_written"] == num_bytes  # nothing was overwritten
    assert b"cachelm_bytes_stored{" in cache.metrics.exposition()


def test_set_price_overrides_and_refreshes_resolved_prices() -> None:
    m = CacheMetrics()
    assert m.price("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    m.set_price("gpt-4o-mini-2024-07-18", Price(input=9.0, output=9.0))
    assert m.price("gpt-4o-mini-2024-07-18") == Price(input=9.0, output=9.0)
    with pytest.raises(TypeError):
        m.prices["x"] = Price(input=1.0, output=1.0)  # type: ignore[index]
    with pytest.raises(ConfigError, match="`price`"):
        m.set_price("x", 1.0)  # type: ignore[arg-type]
