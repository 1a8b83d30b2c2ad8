"""TieredStore: an LRU-bounded memory L1 over real L2 stores (memory, SQLite, the real Redis server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cachelm.errors import BackendError, ConfigError
from cachelm.policy import LRUPolicy
from cachelm.store import Match, MemoryStore, Record, SQLiteStore, Store
from cachelm.store.bounded import BoundedStore
from cachelm.store.redis import RedisStore
from cachelm.store.tiered import TieredStore


@pytest.fixture(params=["memory", "sqlite", "redis"])
def l2(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, namespace: str) -> Iterator[Store]:
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "sqlite":
        store = SQLiteStore(tmp_path / "l2.db")
    else:
        store = RedisStore.from_url(redis_url, namespace=namespace)
    yield store
    if request.param == "redis":
        store.clear()
    store.close()


def l1(max_entries: int = 4) -> BoundedStore:
    return BoundedStore(MemoryStore(), LRUPolicy(max_entries=max_entries))


def rec(key: str, value: bytes = b"v", **kw: object) -> Record:
    return Record(key=key, value=value, **kw)  # type: ignore[arg-type]


def test_l2_hit_fills_l1_then_l1_answers(l2: Store) -> None:
    l2.put(rec("a", b"from-l2"))
    tiered = TieredStore(l1(), l2)
    first = tiered.get("a")
    assert first is not None and first.value == b"from-l2"
    assert tiered.l1.peek("a") is not None
    second = tiered.get("a")
    assert second is not None and second.value == b"from-l2"
    assert (tiered.stats.l1_hits, tiered.stats.l2_hits, tiered.stats.misses) == (1, 1, 0)
    assert tiered.get("missing") is None and tiered.stats.misses == 1


def test_put_delete_purge_apply_to_both(l2: Store) -> None:
    tiered = TieredStore(l1(), l2)
    tiered.put(rec("a", tenant="t1"))
    tiered.put(rec("b", tenant="t2"))
    assert tiered.l1.peek("a") is not None and l2.peek("a") is not None
    assert tiered.delete("a") is True
    assert tiered.l1.peek("a") is None and l2.peek("a") is None
    assert tiered.purge(Match(tenant="t2")) == 1
    assert tiered.l1.peek("b") is None and l2.peek("b") is None
    tiered.put(rec("c"))
    assert tiered.clear() == 1 and len(tiered.l1) == 0


def test_invalidate_local_exposes_another_replicas_write(l2: Store) -> None:
    tiered = TieredStore(l1(), l2)
    tiered.put(rec("k", b"old"))
    l2.put(rec("k", b"new"))  # another replica overwrites the shared tier
    stale = tiered.get("k")
    assert stale is not None and stale.value == b"old"  # L1 still answers until told
    assert tiered.invalidate_local("k") is True
    fresh = tiered.get("k")
    assert fresh is not None and fresh.value == b"new"
    tiered.clear_local()
    assert len(tiered.l1) == 0 and tiered.peek("k") is not None


def test_l1_stays_bounded_while_l2_keeps_everything(l2: Store) -> None:
    tiered = TieredStore(l1(max_entries=3), l2)
    for i in range(10):
        tiered.put(rec(f"k{i}"))
    assert len(tiered.l1) == 3 and len(l2) == 10
    assert tiered.get("k0") is not None and tiered.stats.l2_hits == 1


def test_dead_l2_reads_as_miss_and_counts() -> None:
    # A real client pointed at a port where nothing listens: every call fails like a server that went away.
    dead = RedisStore.from_url("redis://127.0.0.1:1/0", namespace="dead", socket_connect_timeout=0.2)
    tiered = TieredStore(l1(), dead)
    assert tiered.get("a") is None
    assert tiered.stats.l2_errors == 1 and tiered.stats.errors == 1
    with pytest.raises(BackendError):
        tiered.put(rec("a"))
    assert tiered.l1.peek("a") is None  # L1 never holds what L2 refused
    tiered.l1.put(rec("b"))
    hit = tiered.get("b")
    assert hit is not None and tiered.stats.l1_hits == 1  # L1 keeps serving while L2 is down


def test_bad_arguments() -> None:
    store = MemoryStore()
    with pytest.raises(ConfigError, match="`l1`"):
        TieredStore(object(), store)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="different"):
        TieredStore(store, store)
    with pytest.raises(ConfigError, match="`record`"):
        TieredStore(MemoryStore(), store).put("nope")  # type: ignore[arg-type]


def test_l1_hits_reach_l2_in_batches_before_scans_and_on_close(l2: Store) -> None:
    tiered = TieredStore(l1(), l2, hit_flush=5)
    tiered.put(rec("a"))
    tiered.put(rec("b"))
    for _ in range(3):
        assert tiered.get("a") is not None  # L1 hits
    assert l2.peek("a").hits == 0  # type: ignore[union-attr]  # pending, not written yet
    assert tiered.get("b") is not None and tiered.get("b") is not None  # the fifth pending hit: a batch
    assert {r.key: r.hits for r in l2.scan()} == {"a": 3, "b": 2}
    tiered.get("a")
    assert {r.key: r.hits for r in tiered.scan()} == {"a": 4, "b": 2}  # a scan writes the batch first
    tiered.get("b")
    tiered.put(rec("b", b"v2"))  # hits counted on the replaced record do not move to the new one
    tiered.get("a")
    tiered.delete("a")
    tiered.put(rec("a", b"v3"))
    assert tiered.flush_hits() == 0  # nothing left: both keys were rewritten
    assert l2.peek("a").hits == 0 and l2.peek("b").hits == 0  # type: ignore[union-attr]


def test_close_writes_the_pending_l1_hits(tmp_path: Path) -> None:
    tiered = TieredStore(l1(), SQLiteStore(tmp_path / "l2.db"))
    tiered.put(rec("a"))
    tiered.get("a")
    tiered.get("a")
    tiered.close()
    with SQLiteStore(tmp_path / "l2.db") as reopened:
        assert reopened.peek("a").hits == 2  # type: ignore[union-attr]


def test_l1_hits_are_dropped_when_l2_is_down_and_counted() -> None:
    dead = RedisStore.from_url("redis://127.0.0.1:1/0", namespace="dead", socket_connect_timeout=0.2)
    tiered = TieredStore(l1(), dead, hit_flush=2)
    tiered.l1.put(rec("a"))
    assert tiered.get("a") is not None and tiered.get("a") is not None  # the batch fails: still served
    assert tiered.stats.l2_errors == 1 and tiered.flush_hits() == 0
    with pytest.raises(ConfigError, match="hit_flush"):
        TieredStore(l1(), MemoryStore(), hit_flush=0)
