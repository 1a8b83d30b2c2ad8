"""Review of the record stores: interleavings, bad input and damaged files that the contract suite misses.

Interleavings are made deterministic with an injected clock (`HookClock`): stores read the clock between
reading a record and acting on it, so the clock runs "another writer" at exactly that moment. The other
writer is a real second store (another connection to the same SQLite file) or the same store from the
same thread, never a mock.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cachelm.clock import ManualClock
from cachelm.errors import ConfigError
from cachelm.policy import LRUPolicy
from cachelm.response.exact import ExactCache
from cachelm.response.memoize import memoize
from cachelm.store import Match, MemoryStore, Record, SQLiteStore, Store
from cachelm.store.bounded import BoundedStore
from cachelm.store.redis import RedisStore
from cachelm.store.tiered import TieredStore

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}]}


class HookClock:
    """A manual clock that runs `hook` (once) the next time it is read."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.hook: Callable[[], object] | None = None

    def __call__(self) -> float:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.now


@pytest.fixture(params=["memory", "sqlite", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Store]:
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "sqlite":
        store = SQLiteStore(tmp_path / "any.db")
    else:
        store = RedisStore.from_url(request.getfixturevalue("redis_url"), namespace=namespace)
    yield store
    if isinstance(store, RedisStore):
        store.clear()
    store.close()


# -- bad input: non-finite times, strings that cannot be stored ----------------------------------------------


@pytest.mark.parametrize("field", ["created", "expires"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_record_rejects_non_finite_times(field: str, bad: float) -> None:
    # Before: accepted; SQLite then wrote metadata JSON ("Infinity") that no reader can parse, so the record
    # read back as corrupt and was deleted, and Redis raised OverflowError (not BackendError) from `put`.
    with pytest.raises(ConfigError, match=f"`{field}`"):
        Record(key="k", value=b"v", **{field: bad})  # type: ignore[arg-type]


def test_exact_cache_and_memoize_reject_an_infinite_ttl(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ttl.db")
    cache = ExactCache(store)
    with pytest.raises(ConfigError, match="`ttl`"):
        cache.store(REQUEST, ANSWER, ttl=math.inf)
    with pytest.raises(ConfigError, match="`default_ttl`"):
        ExactCache(store, default_ttl=math.inf)
    with pytest.raises(ConfigError, match="`ttl`"):
        memoize(store, ttl=math.inf)
    assert store.stats.corrupt_reads == 0 and len(store) == 0
    store.close()


def test_redis_far_future_expiry_is_stored_whole(redis_url: str, namespace: str) -> None:
    # Before: PEXPIREAT rejected the expiry after the script had written the value and metadata, so `put`
    # raised BackendError yet left a record that no index (purge by tenant, scan) knew about.
    store = RedisStore.from_url(redis_url, namespace=namespace)
    try:
        store.put(Record(key="k", value=b"v", tenant="acme", expires=1e300))
        record = store.get("k")
        assert record is not None and record.expires == 1e300
        assert [r.key for r in store.scan(Match(tenant="acme"))] == ["k"]
        assert store.purge(Match(tenant="acme")) == 1
        assert store.client.keys(f"{namespace}:*") == [] and store.stats.errors == 0
    finally:
        store.clear()
        store.close()


@pytest.mark.parametrize("field", ["key", "tenant", "user", "model", "tags"])
def test_lone_surrogates_are_config_errors_and_write_nothing(any_store: Store, field: str) -> None:
    # A str with a lone surrogate has no UTF-8 form. Before: MemoryStore kept it, SQLite raised a bare
    # UnicodeEncodeError, and Redis wrote the value and metadata, then failed inside its script before
    # indexing them (a record `purge(tenant)` cannot find).
    bad = "x\ud800"
    fields: dict[str, object] = {"key": "k", "value": b"v", "tenant": "acme"}
    fields[field] = frozenset({bad}) if field == "tags" else bad
    with pytest.raises(ConfigError, match=f"`{field}"):
        any_store.put(Record(**fields))  # type: ignore[arg-type]
    for operation in (any_store.get, any_store.peek, any_store.delete):
        with pytest.raises(ConfigError, match="`key`"):
            operation(bad)
    assert len(any_store) == 0 and list(any_store.scan()) == []
    if isinstance(any_store, RedisStore):
        assert any_store.client.keys(f"{any_store.namespace}:*") == []


def test_non_ascii_strings_round_trip(any_store: Store) -> None:
    record = Record(
        key="ключ-🔑",
        value=b"\x00\xff" * 1000,
        tenant="テナント",
        user="usér",
        model="模型",
        tags=frozenset({"😀"}),
    )
    any_store.put(record)
    assert any_store.get(record.key) == record
    assert [r.key for r in any_store.scan(Match(tenant="テナント", tag="😀"))] == [record.key]
    assert any_store.purge(Match(user="usér")) == 1 and any_store.get(record.key) is None


# -- SQLite: read-path deletes must not hit a record written meanwhile ---------------------------------------


def test_sqlite_expired_read_keeps_a_record_written_meanwhile(tmp_path: Path) -> None:
    # Reader A finds the record expired; before A deletes it, writer B (another connection, as another
    # process would be) replaces it with a fresh one. Before: A deleted by key, losing B's write.
    clock = HookClock(1000.0)
    reader = SQLiteStore(tmp_path / "race.db", clock=clock)
    writer = SQLiteStore(tmp_path / "race.db", clock=ManualClock(1000.0))
    try:
        reader.put(Record(key="k", value=b"old", created=900.0, expires=950.0))
        fresh = Record(key="k", value=b"new", created=1000.0, expires=5000.0)
        clock.hook = lambda: writer.put(fresh)
        assert reader.get("k") is None  # what A read was expired
        assert writer.peek("k") == fresh and reader.get("k") == fresh
    finally:
        reader.close()
        writer.close()


def test_sqlite_corrupt_read_keeps_a_record_written_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "corrupt-race.db"
    reader = SQLiteStore(path)
    writer = SQLiteStore(path)
    try:
        reader.put(Record(key="k", value=b"old"))
        raw = sqlite3.connect(path)
        raw.execute("UPDATE records SET value = x'00' WHERE key = 'k'")
        raw.commit()
        raw.close()
        fresh = Record(key="k", value=b"new")

        class RacingStats(type(reader.stats)):  # type: ignore[misc]
            def add(self, name: str, amount: int = 1) -> None:
                super().add(name, amount)
                if name == "corrupt_reads":
                    writer.put(fresh)  # lands between the corrupt read and its delete

        reader.stats = RacingStats()
        assert reader.get("k") is None and reader.stats.corrupt_reads == 1
        assert writer.peek("k") == fresh
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize(
    "garble",
    ["CAST(x'6bff31' AS TEXT)", "x'6b31'"],  # invalid UTF-8 text; a BLOB where a TEXT key belongs
)
def test_sqlite_garbled_key_cell_is_dropped_not_fatal(tmp_path: Path, garble: str) -> None:
    # Before: every scan failed (BackendError "Could not decode to UTF-8", or ConfigError on a bytes key),
    # so a BoundedStore over the file could not even open, and the bad row was never dropped.
    path = tmp_path / "garbled.db"
    store = SQLiteStore(path)
    for i in range(3):
        store.put(Record(key=f"k{i}", value=b"v", tenant="t"))
    raw = sqlite3.connect(path)
    raw.execute(f"UPDATE records SET key = {garble} WHERE key = 'k1'")
    raw.commit()
    raw.close()
    assert sorted(r.key for r in store.scan()) == ["k0", "k2"]
    assert store.stats.corrupt_reads == 1 and len(store) == 2
    bounded = BoundedStore(store, LRUPolicy(max_entries=5))
    assert sorted(bounded.policy) == ["k0", "k2"]
    bounded.close()


def test_sqlite_open_waits_for_another_opener_of_a_fresh_file(tmp_path: Path) -> None:
    # Several processes opening one new file: while one holds a write lock on it (switching it to WAL,
    # creating the tables), switching to WAL in another returns "database is locked" at once: SQLite does
    # not call the busy handler there. Before: the second store failed to open instead of waiting.
    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        store = SQLiteStore(path, busy_timeout_s=10.0)
        store.put(Record(key="k", value=b"v"))
        assert store.get("k") is not None
        store.close()
    finally:
        release.join()
        other.close()


# -- TieredStore: an L1 fill must not bring back what a writer changed during the L2 read -----------------


def _tiered(tmp_path: Path, clock: HookClock) -> TieredStore:
    l1 = BoundedStore(MemoryStore(clock=clock), LRUPolicy(max_entries=16))
    return TieredStore(l1, SQLiteStore(tmp_path / f"{uuid.uuid4().hex}.db", clock=clock))


@pytest.mark.parametrize(
    "change",
    ["delete", "purge", "put", "invalidate_local", "purge_local"],
)
def test_tiered_fill_does_not_resurrect_or_go_stale(tmp_path: Path, change: str) -> None:
    # Reader: L1 miss, L2 read. Meanwhile (the clock hook, read by L2 right after its read) a writer deletes,
    # purges or replaces the key, or a replica's invalidation arrives. Before: the reader then filled L1 with
    # what it had read, so L1 served an erased record, or an old value, until evicted.
    clock = HookClock(1000.0)
    tiered = _tiered(tmp_path, clock)
    tiered.put(Record(key="k", value=b"v1", tenant="acme", created=1000.0))
    tiered.clear_local()
    new = Record(key="k", value=b"v2", tenant="acme", created=1000.0)
    other_l2 = SQLiteStore(tiered.l2.path)  # type: ignore[attr-defined]  # another replica's view
    changes: dict[str, Callable[[], object]] = {
        "delete": lambda: tiered.delete("k"),
        "purge": lambda: tiered.purge(Match(tenant="acme")),
        "put": lambda: tiered.put(new),
        "invalidate_local": lambda: (other_l2.put(new), tiered.invalidate_local("k")),
        "purge_local": lambda: (other_l2.delete("k"), tiered.purge_local(Match(tenant="acme"))),
    }
    clock.hook = changes[change]
    tiered.get("k")  # read v1 from L2; the change lands before the fill
    expected = b"v2" if change in ("put", "invalidate_local") else None
    in_l2 = tiered.l2.peek("k")
    assert (in_l2 and in_l2.value) == expected
    got = tiered.get("k")
    assert (got and got.value) == expected
    other_l2.close()
    tiered.close()


class RacingSQLiteStore(SQLiteStore):
    """A real SQLite store that runs `after_put` (once) right after a put commits: another writer's turn."""

    after_put: Callable[[], object] | None = None

    def put(self, record: Record) -> None:
        super().put(record)
        hook, self.after_put = self.after_put, None
        if hook is not None:
            hook()


@pytest.mark.parametrize("writer_b", ["same process", "another replica"])
def test_tiered_two_writers_of_one_key_leave_l1_agreeing_with_l2(tmp_path: Path, writer_b: str) -> None:
    # Writer A puts L2, then L1; writer B's whole put lands between A's two steps. Before: L1 kept A's value
    # while L2 held B's, and L1 served A's value until evicted.
    l2 = RacingSQLiteStore(tmp_path / "writers.db")
    tiered = TieredStore(BoundedStore(MemoryStore(), LRUPolicy(max_entries=16)), l2)
    a, b = Record(key="k", value=b"from-a"), Record(key="k", value=b"from-b")
    other_l2 = SQLiteStore(l2.path)
    if writer_b == "same process":
        l2.after_put = lambda: tiered.put(b)
    else:  # B's write reaches the shared L2, then our L1 through an invalidation message
        l2.after_put = lambda: (other_l2.put(b), tiered.invalidate_local("k"))
    tiered.put(a)
    assert l2.peek("k") == b
    got = tiered.get("k")
    assert got is not None and got.value == b"from-b"
    other_l2.close()
    tiered.close()


# -- BoundedStore: the policy must not track a record deleted during an unlocked read ---------------------


def test_bounded_get_does_not_adopt_a_record_deleted_meanwhile(tmp_path: Path) -> None:
    # A get reads "a" from the inner store (outside the lock); a concurrent delete removes it; the get then
    # found "a" untracked and adopted it. Before: the policy kept charging for a record that does not exist
    # and evicted a live one ("b") to make room for "c".
    clock = HookClock(1000.0)
    bounded = BoundedStore(SQLiteStore(tmp_path / "b.db", clock=clock), LRUPolicy(max_entries=2))
    bounded.put(Record(key="a", value=b"1"))
    bounded.put(Record(key="b", value=b"2"))
    clock.hook = lambda: bounded.delete("a")
    bounded.get("a")
    assert "a" not in bounded.policy
    bounded.put(Record(key="c", value=b"3"))
    assert sorted(r.key for r in bounded.scan()) == ["b", "c"] and bounded.evictions == 0
    bounded.close()


# -- Redis: a dropped connection or a stalled server is a miss on the serving path, and loses nothing -------


def test_redis_connection_killed_between_calls_is_one_miss(redis_url: str, namespace: str) -> None:
    store = RedisStore.from_url(redis_url, namespace=namespace)
    cache = ExactCache(TieredStore(BoundedStore(MemoryStore(), LRUPolicy(max_entries=4)), store))
    try:
        key = cache.store(REQUEST, ANSWER)
        assert key is not None
        cache.backend.clear_local()  # type: ignore[attr-defined]
        control = redis.Redis.from_url(redis_url)
        my_id = store.client.client_id()
        control.client_kill_filter(_id=my_id)
        cache.lookup(REQUEST)  # the killed connection: a hit (redis-py reconnected) or a miss, never a raise
        hit = cache.lookup(REQUEST)  # the record is still there
        assert hit is not None and hit.response == ANSWER
        control.close()
    finally:
        store.clear()
        store.close()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/cache", "unix:///tmp/redis.sock?db=two"])
def test_a_redis_database_that_is_not_a_number_is_refused(url: str) -> None:
    """redis-py read "/cache" as database 0: another database than the one meant, without a word."""
    with pytest.raises(ConfigError, match="the database must be a number"):
        RedisStore.from_url(url)


class _ReaderWithAWriterBetween(RedisStore):
    """A real RedisStore whose reads run `between` (once) after fetching a record and before judging it:
    the moment another writer's put lands in a real race."""

    between: Callable[[], object] | None = None

    def _decode(self, key: str, fields: Any) -> Record | None:
        record = super()._decode(key, fields)
        hook, self.between = self.between, None
        if hook is not None:
            hook()
        return record


def test_redis_corrupt_read_keeps_a_record_written_meanwhile(redis_url: str, namespace: str) -> None:
    """The reader that found `k` corrupt deleted it by key, and with it the fresh record another writer had
    just put; now it deletes only the bytes it judged."""
    reader = _ReaderWithAWriterBetween.from_url(redis_url, namespace=namespace)
    writer = RedisStore.from_url(redis_url, namespace=namespace)
    try:
        writer.put(Record(key="k", value=b"old answer", tenant="acme"))
        redis.Redis.from_url(redis_url).hset(reader._r("k"), "v", b"garbled bytes")  # fails its checksum
        reader.between = lambda: writer.put(Record(key="k", value=b"fresh answer", tenant="acme"))
        assert reader.get("k") is None and reader.stats.corrupt_reads == 1
        fresh = writer.get("k")
        assert fresh is not None and fresh.value == b"fresh answer"
        assert [r.key for r in writer.scan(Match(tenant="acme"))] == ["k"]  # still indexed
        redis.Redis.from_url(redis_url).hset(reader._r("k"), "v", b"garbled again")
        assert reader.get("k") is None and writer.peek("k") is None  # no writer between: dropped
    finally:
        writer.clear()
        reader.close()
        writer.close()
