"""BoundedStore: a policy applied to real stores (memory, SQLite, the real Redis server)."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachelm.clock import ManualClock
from cachelm.errors import ConfigError
from cachelm.policy import GDSFPolicy, LFUPolicy, LRUPolicy, TTLPolicy
from cachelm.store import Match, MemoryStore, Record, SQLiteStore, Store
from cachelm.store.bounded import BoundedStore
from cachelm.store.redis import RedisStore

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_inner(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, namespace: str
) -> Iterator[StoreFactory]:
    """Opens the same underlying store each call (so a test can reopen it)."""
    clock = ManualClock(1_000_000.0)
    opened: list[Store] = []

    def make() -> Store:
        store: Store
        if request.param == "memory":
            if not opened:
                opened.append(MemoryStore(clock=clock))
            return opened[0]
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "bounded.db", clock=clock)
        else:
            store = RedisStore.from_url(redis_url, namespace=namespace)
        opened.append(store)
        return store

    yield make
    if request.param == "redis" and opened:
        opened[-1].clear()
    for store in opened:
        store.close()


def rec(key: str, size: int = 1, created: float = 0.0, **kw: object) -> Record:
    return Record(key=key, value=b"x" * size, created=created, **kw)  # type: ignore[arg-type]


def test_lru_by_entries_deletes_victims_from_inner(make_inner: StoreFactory) -> None:
    store = BoundedStore(make_inner(), LRUPolicy(max_entries=3))
    for key in "abc":
        store.put(rec(key))
    assert store.get("a") is not None  # a becomes most recent
    store.put(rec("d"))
    assert {r.key for r in store.scan()} == {"a", "c", "d"}
    assert store.get("b") is None and store.evictions == 1
    assert len(store.inner) == 3


def test_bytes_capacity_and_refused_record(make_inner: StoreFactory) -> None:
    store = BoundedStore(make_inner(), LRUPolicy(max_bytes=100))
    store.put(rec("a", 40))
    store.put(rec("b", 40))
    store.put(rec("c", 40))  # evicts a
    assert {r.key for r in store.scan()} == {"b", "c"}
    store.put(rec("b", 150))  # too large: refused, and the old b must not linger
    assert store.get("b") is None and store.peek("b") is None
    assert store.policy.total_bytes == 40


def test_delete_and_purge_free_capacity(make_inner: StoreFactory) -> None:
    store = BoundedStore(make_inner(), LRUPolicy(max_entries=3))
    store.put(rec("a", tenant="t1"))
    store.put(rec("b", tenant="t2"))
    store.put(rec("c", tenant="t2"))
    assert store.delete("a") is True
    assert store.purge(Match(tenant="t2")) == 2
    assert len(store.policy) == 0
    for key in "xyz":
        store.put(rec(key))
    assert store.evictions == 0 and len(store) == 3
    assert store.clear() == 3 and len(store.policy) == 0


def test_reopen_rebuilds_policy_and_trims_to_capacity(make_inner: StoreFactory) -> None:
    inner = make_inner()
    for i in range(6):
        inner.put(rec(f"k{i}", created=1_000_000.0 + i))
    inner.get("k0")  # a stored hit: replayed on open, so k0 counts as recent
    store = BoundedStore(inner, LRUPolicy(max_entries=4))
    assert set(store.policy) == {"k0", "k3", "k4", "k5"}
    assert {r.key for r in store.scan()} == {"k0", "k3", "k4", "k5"}
    store.put(rec("new"))
    assert "k3" not in store.policy and store.peek("k3") is None


def test_record_written_by_another_process_is_adopted_on_read(make_inner: StoreFactory) -> None:
    store = BoundedStore(make_inner(), LRUPolicy(max_entries=2))
    store.put(rec("a"))
    store.put(rec("b"))
    store.inner.put(rec("c"))  # another writer, bypassing this process's policy
    assert store.get("c") is not None
    assert set(store.policy) == {"b", "c"} and store.peek("a") is None


def test_miss_forgets_policy_entry() -> None:
    clock = ManualClock(100.0)
    store = BoundedStore(MemoryStore(clock=clock), LRUPolicy(max_entries=2))
    store.put(Record(key="a", value=b"1", created=100.0, expires=110.0))
    clock.advance(20)
    assert store.get("a") is None and "a" not in store.policy


def test_ttl_policy_expiry_is_applied_to_inner() -> None:
    clock = ManualClock(0.0)
    store = BoundedStore(MemoryStore(clock=clock), TTLPolicy(ttl=5, max_entries=10, timer=clock))
    store.put(rec("a"))
    clock.advance(6)
    store.put(rec("b"))  # the TTL policy evicts a first
    assert store.peek("a") is None
    clock.advance(6)
    assert store.expire() == 1 and len(store) == 0


def test_hit_on_a_record_whose_ttl_ran_out_is_a_miss() -> None:
    clock = ManualClock(0.0)
    store = BoundedStore(MemoryStore(clock=clock), TTLPolicy(ttl=5, timer=clock))
    store.put(rec("a"))
    assert store.get("a") is not None
    clock.advance(5)
    assert store.get("a") is None and store.peek("a") is None and "a" not in store.policy


def test_cost_function_feeds_cost_aware_policy() -> None:
    costs = {"cheap": 1.0, "pricey": 100.0, "mid": 10.0}
    store = BoundedStore(MemoryStore(), GDSFPolicy(max_entries=2), cost=lambda r: costs.get(r.key, 5.0))
    store.put(rec("pricey", 10))
    store.put(rec("cheap", 10))
    store.put(rec("mid", 10))
    assert {r.key for r in store.scan()} == {"pricey", "mid"}


def test_reuse_equals_recompute_and_hits_match_an_lru_model() -> None:
    """Get-or-compute through a bounded store: every served value equals a fresh computation, and the
    hit/miss sequence is exactly an LRU's."""
    store = BoundedStore(MemoryStore(), LRUPolicy(max_entries=8))
    model: OrderedDict[str, None] = OrderedDict()
    rng = random.Random(3)

    def compute(key: str) -> bytes:
        return f"answer for {key}".encode()

    hits = 0
    for _ in range(2000):
        key = f"q{min(int(rng.paretovariate(1.0)), 40)}"
        record = store.get(key)
        expected_hit = key in model
        if expected_hit:
            model.move_to_end(key)
        assert (record is not None) == expected_hit
        if record is None:
            store.put(Record(key=key, value=compute(key)))
            model[key] = None
            if len(model) > 8:
                model.popitem(last=False)
        else:
            hits += 1
            assert record.value == compute(key)
    assert 0 < hits < 2000


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="`inner`"):
        BoundedStore(object(), LRUPolicy())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`policy`"):
        BoundedStore(MemoryStore(), object())  # type: ignore[arg-type]
    policy = LFUPolicy()
    policy.insert("x", 1)
    with pytest.raises(ConfigError, match="`policy` must be empty"):
        BoundedStore(MemoryStore(), policy)
    with pytest.raises(ConfigError, match="`where`"):
        BoundedStore(MemoryStore(), LRUPolicy()).purge(Match())
