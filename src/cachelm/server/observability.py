"""Observability of the proxy: structured JSON logs, request metrics, and the dashboard's time series.

Request metrics are registered on the cache's own `CacheMetrics.registry`, so ``/metrics`` exposes cache
and server series together from one private registry. The dashboard reads `TimeSeries`: fixed buckets
(default 10 s, one hour kept) of request counts per outcome, latency quantiles, and tokens/cost saved.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

from cachelm.metrics import LATENCY_BUCKETS, CacheMetrics, nearest_rank

OUTCOMES = ("hit", "semantic-hit", "miss", "bypass", "error")

_RESERVED = frozenset(vars(logging.makeLogRecord({})))


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info") -> None:
    """Send the ``cachelm`` loggers to stderr as JSON lines (called once at the server entry point)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("cachelm")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class AccessLog:
    """Per-request JSON lines, buffered: one write call per `batch` lines or per `interval_s`.

    Why not `logging`: building a LogRecord and formatting it costs more than a cache hit itself (a fifth
    of the hit path's CPU in a profile). Lines go to `stream` (stderr) in the same JSON shape as
    `JSONFormatter`'s, at most `interval_s` late; `flush` runs at shutdown.
    """

    def __init__(self, stream: Any = None, *, batch: int = 64, interval_s: float = 0.25) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.batch = batch
        self.interval_s = interval_s
        self._lines: list[bytes] = []
        self._last_flush = time.monotonic()

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()
        self._lines.append(
            orjson.dumps({"ts": round(now, 6), "level": "info", "logger": "cachelm.access", **fields})
        )
        if len(self._lines) >= self.batch or time.monotonic() - self._last_flush > self.interval_s:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data = b"\n".join(self._lines) + b"\n"
        self._lines.clear()
        self._last_flush = time.monotonic()
        try:
            buffer = getattr(self.stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                self.stream.write(data.decode())
        except (OSError, ValueError):
            pass  # a closed or broken log stream must never fail a request


@dataclass
class _Bucket:
    start: float
    counts: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    tokens_saved: int = 0
    cost_saved_usd: float = 0.0


class TimeSeries:
    """Per-interval request outcomes, latency and savings. Appends are O(1); the last `keep` buckets stay."""

    def __init__(self, *, interval_s: float = 10.0, keep: int = 360, max_samples: int = 2048) -> None:
        self.interval_s = interval_s
        self.max_samples = max_samples
        self._buckets: deque[_Bucket] = deque(maxlen=keep)

    def _current(self, now: float) -> _Bucket:
        start = now - now % self.interval_s
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start=start))
        return self._buckets[-1]

    def record(self, outcome: str, latency_s: float, *, tokens: int = 0, cost: float = 0.0) -> None:
        bucket = self._current(time.time())
        bucket.counts[outcome] = bucket.counts.get(outcome, 0) + 1
        if len(bucket.latencies) < self.max_samples:  # a bounded sample per bucket keeps memory flat
            bucket.latencies.append(latency_s)
        bucket.tokens_saved += tokens
        bucket.cost_saved_usd += cost

    def points(self) -> list[dict[str, Any]]:
        out = []
        for bucket in list(self._buckets):
            ordered = sorted(bucket.latencies)
            total = sum(bucket.counts.values())
            hits = bucket.counts.get("hit", 0) + bucket.counts.get("semantic-hit", 0)
            p50 = nearest_rank(ordered, 0.5)
            p99 = nearest_rank(ordered, 0.99)
            out.append(
                {
                    "t": bucket.start,
                    "requests": total,
                    "counts": dict(bucket.counts),
                    "hit_rate": hits / total if total else 0.0,
                    "p50_ms": None if math.isnan(p50) else 1000 * p50,
                    "p99_ms": None if math.isnan(p99) else 1000 * p99,
                    "tokens_saved": bucket.tokens_saved,
                    "cost_saved_usd": bucket.cost_saved_usd,
                }
            )
        return out


class ServerMetrics:
    """Request-level series of the proxy, on the cache metrics' registry."""

    def __init__(self, cache_metrics: CacheMetrics) -> None:
        self.cache_metrics = cache_metrics
        registry = cache_metrics.registry
        self.requests = Counter(
            "requests",
            "Proxy requests by endpoint, cache outcome and status.",
            ["endpoint", "cache", "status"],
            namespace="cachelm_server",
            registry=registry,
        )
        self.latency = Histogram(
            "request_seconds",
            "End-to-end proxy latency by cache outcome.",
            ["cache"],
            buckets=LATENCY_BUCKETS,
            namespace="cachelm_server",
            registry=registry,
        )
        self.upstream_calls = Counter(
            "upstream_calls",
            "Calls made to the upstream.",
            ["endpoint"],
            namespace="cachelm_server",
            registry=registry,
        )
        self.degraded = Counter(
            "degraded",
            "Shared-mode operations that fell back to local behaviour.",
            ["what"],
            namespace="cachelm_server",
            registry=registry,
        )
        self.series = TimeSeries()
        self.totals: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.started = time.time()
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(
        self, endpoint: str, outcome: str, status: int, seconds: float, *, tokens: int = 0, cost: float = 0.0
    ) -> None:
        # Labelled children are looked up once per label set: `labels()` takes a lock and hashes strings.
        children = self._children.get((endpoint, outcome, status))
        if children is None:
            children = (self.requests.labels(endpoint, outcome, str(status)), self.latency.labels(outcome))
            self._children[(endpoint, outcome, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        self.totals[outcome] = self.totals.get(outcome, 0) + 1
        self.series.record(outcome, seconds, tokens=tokens, cost=cost)
