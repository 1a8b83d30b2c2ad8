"""memoize: tool results cached by their arguments, sync and async, TTL, exceptions never cached."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachelm.clock import ManualClock
from cachelm.errors import ConfigError
from cachelm.metrics import CacheMetrics
from cachelm.response.exact import ExactCache
from cachelm.response.memoize import memoize
from cachelm.store.base import Store
from cachelm.store.memory import MemoryStore
from cachelm.store.redis import RedisStore
from cachelm.store.sqlite import SQLiteStore


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(float(int(time.time())))


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, clock: ManualClock, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore(clock=clock)
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "t.db", clock=clock)
    else:
        url, ns = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
        s = RedisStore.from_url(url, namespace=ns, clock=clock)
    yield s
    if request.param == "redis":
        s.clear()
    s.close()


def weather_impl(city: str, unit: str) -> dict[str, Any]:
    """The 'tool': deterministic in its arguments."""
    return {"city": city, "unit": unit, "temp": len(city) * (1.8 if unit == "F" else 1.0)}


def test_results_are_reused_and_equal_a_recompute(store: Store) -> None:
    calls: list[tuple[str, str]] = []

    @memoize(store)
    def weather(city: str, unit: str = "C") -> dict[str, Any]:
        calls.append((city, unit))
        return weather_impl(city, unit)

    for city, unit in [("Oslo", "C"), ("Rome", "F"), ("Oslo", "C"), ("Rome", "F"), ("Oslo", "F")]:
        assert weather(city, unit) == weather_impl(city, unit)
    assert calls == [("Oslo", "C"), ("Rome", "F"), ("Oslo", "F")]


def test_arguments_are_bound_to_the_signature(store: Store) -> None:
    calls: list[int] = []

    @memoize(store)
    def f(a: int, b: int = 2, *rest: int, **kw: int) -> int:
        calls.append(1)
        return a + b + sum(rest) + sum(kw.values())

    assert f(1) == f(1, 2) == f(a=1, b=2) == f(b=2, a=1) == 3
    assert len(calls) == 1
    assert f.cache_key(1, 2, 3) != f.cache_key(1, 2)
    assert f.cache_key(1, x=1) != f.cache_key(1, y=1)
    assert f.cache_key(1, x=1, y=2) == f.cache_key(1, y=2, x=1)


def test_containers_key_by_value_and_type() -> None:
    store = MemoryStore()

    @memoize(store)
    def g(x: Any) -> str:
        return repr(x)

    assert g.cache_key([1, 2]) != g.cache_key((1, 2))
    assert g.cache_key({"a": 1, "b": [1]}) == g.cache_key({"b": [1], "a": 1})
    assert g.cache_key({1, 2, 3}) == g.cache_key({3, 2, 1})
    assert g.cache_key(b"x") != g.cache_key("x")
    assert g.cache_key(1) != g.cache_key("1")


def test_namespaces_separate_functions(store: Store) -> None:
    @memoize(store, namespace="one")
    def a(x: int) -> int:
        return x

    @memoize(store, namespace="two")
    def b(x: int) -> int:
        return -x

    assert (a(1), b(1)) == (1, -1)
    assert a.cache_key(1) != b.cache_key(1)


def test_unencodable_arguments_are_rejected_unless_a_key_is_given(store: Store) -> None:
    class Conn:
        host = "db1"

    @memoize(store)
    def query(conn: Conn, sql: str) -> list[int]:
        return [len(sql)]

    with pytest.raises(ConfigError, match="argument `conn` has type Conn"):
        query(Conn(), "select 1")
    with pytest.raises(ConfigError, match=r"argument `x\[1\]` must be a finite number"):
        memoize(store)(lambda x: x)([1, float("nan")])

    @memoize(store, key=lambda conn, sql: [conn.host, sql])
    def keyed(conn: Conn, sql: str) -> list[int]:
        return [len(sql)]

    assert keyed(Conn(), "select 1") == [8]
    assert keyed.cache_key(Conn(), "select 1") == keyed.cache_key(Conn(), "select 1")


def test_results_must_round_trip_through_json(store: Store) -> None:
    @memoize(store)
    def pair(x: int) -> Any:
        return (x, x)

    with pytest.raises(ConfigError, match="JSON cannot hold exactly"):
        pair(1)

    @memoize(store)
    def int_keys(x: int) -> Any:
        return {x: x}

    with pytest.raises(ConfigError, match="int_keys"):
        int_keys(1)
    assert len(store) == 0


def test_exceptions_are_never_cached(store: Store) -> None:
    attempts: list[int] = []

    @memoize(store)
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise TimeoutError("tool timed out")
        return x * 10

    with pytest.raises(TimeoutError):
        flaky(3)
    assert flaky(3) == 30
    assert flaky(3) == 30
    assert attempts == [3, 3]


def test_ttl_expires_results(store: Store, clock: ManualClock) -> None:
    calls: list[int] = []

    @memoize(store, ttl=3600)
    def now_playing(room: str) -> str:
        calls.append(1)
        return f"song for {room}"

    now_playing("a")
    clock.advance(3599)
    now_playing("a")
    assert len(calls) == 1
    clock.advance(1)
    now_playing("a")
    assert len(calls) == 2


def test_invalidate_and_cache_clear(store: Store) -> None:
    calls: list[int] = []

    @memoize(store)
    def sq(x: int) -> int:
        calls.append(x)
        return x * x

    @memoize(store)
    def other(x: int) -> int:
        return x

    sq(2), sq(3), other(1)
    assert sq.invalidate(2) is True
    assert sq.invalidate(2) is False
    sq(2)
    assert calls == [2, 3, 2]
    assert sq.cache_clear() == 2
    assert len(store) == 1  # `other` kept its entry


def regional_tools(store: Store) -> Any:
    """A class whose memoized method is keyed by its instance's region (a method needs a key function:
    `self` is not encodable); `calls` counts real computations."""

    class Tools:
        def __init__(self, region: str) -> None:
            self.region = region
            self.calls = 0

        @memoize(store, key=lambda self, q: [self.region, q])
        def search(self, q: str) -> list[str]:
            self.calls += 1
            return [f"{self.region}:{q}"]

    return Tools


def test_methods_use_a_key_function() -> None:
    Tools = regional_tools(MemoryStore())
    eu, us = Tools("eu"), Tools("us")
    assert eu.search("x") == ["eu:x"] and eu.search("x") == ["eu:x"] and eu.calls == 1
    assert us.search("x") == ["us:x"]


def four_callers_of_one_flight(slow: Any, release: threading.Event) -> list[Any]:
    """What four threads calling ``slow(1)`` at once got: the first computes (blocked until `release`),
    released once the other three wait on its flight."""
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(slow(1))) for _ in range(4)]
    for t in threads:
        t.start()
    key = slow.cache_key(1)
    deadline = time.monotonic() + 10
    while slow._flights.waiting(key) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_identical_calls_compute_once() -> None:
    store = MemoryStore()
    release = threading.Event()
    calls: list[int] = []

    @memoize(store)
    def slow(x: int) -> int:
        calls.append(x)
        release.wait(10)
        return x + 1

    assert four_callers_of_one_flight(slow, release) == [2, 2, 2, 2] and calls == [1]


async def test_async_functions(store: Store) -> None:
    calls: list[str] = []

    @memoize(store)
    async def fetch(url: str) -> dict[str, str]:
        calls.append(url)
        await asyncio.sleep(0.01)
        return {"url": url, "body": url.upper()}

    results = await asyncio.gather(*(fetch("a") for _ in range(5)), fetch("b"))
    assert results == [{"url": "a", "body": "A"}] * 5 + [{"url": "b", "body": "B"}]
    assert sorted(calls) == ["a", "b"]
    assert await fetch("a") == {"url": "a", "body": "A"} and len(calls) == 2

    @memoize(store)
    async def failing(x: int) -> int:
        raise ValueError(x)

    with pytest.raises(ValueError):
        await failing(1)
    assert len(store) == 2


def test_results_survive_a_reopened_sqlite_store(tmp_path: Path) -> None:
    calls: list[int] = []

    def tool(x: int) -> int:
        calls.append(x)
        return x * 3

    with SQLiteStore(tmp_path / "tools.db") as s1:
        assert memoize(s1, namespace="tool")(tool)(5) == 15
    with SQLiteStore(tmp_path / "tools.db") as s2:
        assert memoize(s2, namespace="tool")(tool)(5) == 15
    assert calls == [5]


def test_with_an_exact_cache_metrics_and_default_ttl_apply(clock: ManualClock) -> None:
    cache = ExactCache(MemoryStore(clock=clock), clock=clock, default_ttl=10, metrics=CacheMetrics())

    @memoize(cache)
    def f(x: int) -> int:
        return x

    f(1), f(1), f(2)
    assert cache.metrics.count("hits", layer="tool") == 1
    assert cache.metrics.count("misses", layer="tool") == 2
    clock.advance(10)
    f(1)
    assert cache.metrics.count("misses", layer="tool") == 3


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ConfigError, match="`store_or_cache`"):
        memoize({})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`ttl`"):
        memoize(MemoryStore(), ttl=0)
    with pytest.raises(ConfigError, match="`namespace`"):
        memoize(MemoryStore(), namespace="")
    with pytest.raises(ConfigError, match="`key`"):
        memoize(MemoryStore(), key="args")  # type: ignore[arg-type]
