"""The `Store` contract (see cachelm/store/base.py), run against every backend in conftest.BACKENDS."""

from __future__ import annotations

import gc
import itertools
import sqlite3
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from cachelm.errors import ConfigError
from cachelm.store import Match, Record, SQLiteStore, Store
from cachelm.store.sqlite import decode_verified, stored_checksum
from tests.contract.conftest import Backend


def rec(backend: Backend, key: str, value: bytes = b"v", **meta: Any) -> Record:
    meta.setdefault("created", backend.now())
    return Record(key=key, value=value, **meta)


def live_keys(store: Store, where: Match | None = None) -> set[str]:
    return {r.key for r in store.scan(where)}


# -- basic operations --------------------------------------------------------------------------------------


def test_get_missing_is_none(backend: Backend) -> None:
    store = backend.store()
    assert store.get("absent") is None
    assert store.peek("absent") is None
    assert len(store) == 0


def test_put_then_get_returns_every_field(backend: Backend) -> None:
    store = backend.store()
    now = backend.now()
    record = Record(
        key="k1",
        value=bytes(range(256)) * 4,  # every byte value, including NUL
        tenant="acme",
        user="alice",
        tags=frozenset({"docs", "v2", "ünïcode tag"}),
        model="gpt-x@2024-05",
        created=now,
        expires=now + 3600,
    )
    store.put(record)
    assert store.get("k1") == record
    assert len(store) == 1


def test_put_replaces_value_and_metadata(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "k", b"old", tags=frozenset({"old-tag"}), user="u1"))
    store.put(rec(backend, "k", b"new", tags=frozenset({"new-tag"}), user="u2"))
    got = store.get("k")
    assert got is not None and got.value == b"new" and got.tags == {"new-tag"} and got.user == "u2"
    assert len(store) == 1
    # The old record's index entries went with it: purging by its old tag/user finds nothing.
    assert store.purge(Match(tag="old-tag")) == 0
    assert store.purge(Match(user="u1")) == 0
    assert store.peek("k") is not None


def test_delete(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "a"))
    store.put(rec(backend, "b"))
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.get("a") is None
    assert live_keys(store) == {"b"}
    assert len(store) == 1


def test_empty_value_and_large_value(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "empty", b""))
    store.put(rec(backend, "big", b"x" * (1 << 20)))
    empty = store.get("empty")
    assert empty is not None and empty.value == b"" and empty.size == 0
    big = store.get("big")
    assert big is not None and big.value == b"x" * (1 << 20) and big.size == 1 << 20


# -- hits --------------------------------------------------------------------------------------------------


def test_get_counts_hits_and_returns_record_before_the_hit(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "k"))
    hits = [store.get("k").hits for _ in range(3)]  # type: ignore[union-attr]
    assert hits == [0, 1, 2]
    assert store.peek("k").hits == 3  # type: ignore[union-attr]
    assert store.peek("k").hits == 3  # type: ignore[union-attr]  # peek does not count
    assert {r.key: r.hits for r in store.scan()} == {"k": 3}


def test_replacing_a_record_resets_its_hits(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "k"))
    store.get("k")
    store.get("k")
    store.put(rec(backend, "k", b"v2"))
    assert store.peek("k").hits == 0  # type: ignore[union-attr]


def test_add_hits_adds_to_existing_records_only(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "a"))
    store.put(rec(backend, "b"))
    store.get("a")
    store.add_hits({"a": 5, "b": 2, "missing": 7})
    store.add_hits({})
    assert {r.key: r.hits for r in store.scan()} == {"a": 6, "b": 2}  # no record made for "missing"
    assert store.peek("missing") is None and len(store) == 2
    for bad in ({"a": 0}, {"a": -1}, {"a": True}, {"a": 1.5}, {"": 1}, [("a", 1)]):
        with pytest.raises(ConfigError):
            store.add_hits(bad)  # type: ignore[arg-type]


def test_concurrent_threads_lose_no_hits_or_writes(backend: Backend) -> None:
    """Four threads share one store object: every hit is counted and every write lands whole."""
    store = backend.store()
    store.put(rec(backend, "shared", b"shared value"))
    gets_per_thread, threads = 50, 4
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(gets_per_thread):
                assert store.get("shared") is not None
                store.put(rec(backend, f"t{t}-{i}", f"value {t} {i}".encode() * 10))
        except BaseException as exc:  # surfaced below; a thread's exception would otherwise be lost
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert errors == []
    assert store.peek("shared").hits == gets_per_thread * threads  # type: ignore[union-attr]
    found = {r.key: r.value for r in store.scan()}
    assert len(found) == 1 + gets_per_thread * threads
    assert all(
        found[f"t{t}-{i}"] == f"value {t} {i}".encode() * 10 for t in range(threads) for i in range(50)
    )


# -- scan and purge ----------------------------------------------------------------------------------------

FIELDS = {
    "tenant": ("t1", "t2"),
    "user": ("alice", "bob"),
    "model": ("m1", "m2"),
}


def _populate(backend: Backend, store: Store) -> dict[str, Record]:
    """Eight records: every combination of tenant × user × model; tags and created times vary."""
    base = backend.now()
    records: dict[str, Record] = {}
    for i, (tenant, user, model) in enumerate(itertools.product(*FIELDS.values())):
        r = Record(
            key=f"r{i}",
            value=f"value {i}".encode(),
            tenant=tenant,
            user=user,
            model=model,
            tags=frozenset({f"tag{i % 3}", "all"}),
            created=base - 100 + i,
        )
        store.put(r)
        records[r.key] = r
    return records


MATCHES = [
    Match(tenant="t1"),
    Match(user="bob"),
    Match(model="m2"),
    Match(tag="tag1"),
    Match(tag="all"),
    Match(tag="nope"),
    Match(tenant="t2", user="alice"),
    Match(tenant="t1", model="m1", tag="tag0"),
    Match(user="alice", tag="tag2"),
    Match(tenant="t9"),
]


@pytest.mark.parametrize("where", MATCHES, ids=repr)
def test_scan_and_purge_by_match(backend: Backend, where: Match) -> None:
    store = backend.store()
    records = _populate(backend, store)
    expected = {k for k, r in records.items() if where.matches(r)}
    assert live_keys(store, where) == expected
    assert store.purge(where) == len(expected)
    assert live_keys(store) == set(records) - expected
    assert len(store) == len(records) - len(expected)


def test_purge_by_age(backend: Backend) -> None:
    store = backend.store()
    records = _populate(backend, store)
    cutoff = records["r3"].created  # strictly older than r3: r0, r1, r2
    assert live_keys(store, Match(created_before=cutoff)) == {"r0", "r1", "r2"}
    assert store.purge(Match(created_before=cutoff, user="alice")) == 2  # r0, r1 are alice's
    assert live_keys(store) == set(records) - {"r0", "r1"}
    assert store.purge(Match(created_before=cutoff)) == 1


def test_purge_requires_a_field(backend: Backend) -> None:
    store = backend.store()
    store.put(rec(backend, "k"))
    with pytest.raises(ConfigError, match="where"):
        store.purge(Match())
    assert store.peek("k") is not None


def test_clear(backend: Backend) -> None:
    store = backend.store()
    records = _populate(backend, store)
    assert store.clear() == len(records)
    assert len(store) == 0 and live_keys(store) == set()
    store.put(rec(backend, "after"))
    assert live_keys(store) == {"after"}


def test_clear_deletes_expired_records_too(backend: Backend) -> None:
    store = backend.store()
    now = backend.now()
    store.put(rec(backend, "old", created=now, expires=now + backend.ttl))
    store.put(rec(backend, "live", created=now))
    backend.advance(backend.ttl * 1.5)
    assert store.clear() == 1  # counts the live records it deleted
    assert len(store) == 0 and store.expire() == 0  # and left nothing behind


# -- expiry ------------------------------------------------------------------------------------------------


def test_ttl_expiry(backend: Backend) -> None:
    store = backend.store()
    now = backend.now()
    store.put(rec(backend, "short", created=now, expires=now + backend.ttl))
    store.put(rec(backend, "long", created=now, expires=now + 1000 * backend.ttl))
    store.put(rec(backend, "forever", created=now))
    assert live_keys(store) == {"short", "long", "forever"}
    backend.advance(backend.ttl * 1.5)
    assert store.get("short") is None
    assert store.peek("short") is None
    assert live_keys(store) == {"long", "forever"}
    assert store.get("long") is not None and store.get("forever") is not None


def test_expire_deletes_expired_records(backend: Backend) -> None:
    store = backend.store()
    now = backend.now()
    for i in range(3):
        store.put(rec(backend, f"e{i}", created=now, expires=now + backend.ttl))
    store.put(rec(backend, "keep", created=now, expires=now + 1000 * backend.ttl))
    backend.advance(backend.ttl * 1.5)
    assert store.expire() == 3
    assert len(store) == 1
    assert store.expire() == 0
    assert live_keys(store) == {"keep"}


def test_expired_records_are_not_purged_or_counted_as_live(backend: Backend) -> None:
    store = backend.store()
    now = backend.now()
    store.put(rec(backend, "old", created=now, expires=now + backend.ttl, tenant="t"))
    store.put(rec(backend, "new", created=now, tenant="t"))
    backend.advance(backend.ttl * 1.5)
    assert store.purge(Match(tenant="t")) == 1
    assert store.clear() == 0


# -- corruption --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["value", "meta"])
def test_corrupt_record_reads_as_miss_and_is_counted(backend: Backend, what: str) -> None:
    corrupt = backend.corrupt_value if what == "value" else backend.corrupt_meta
    if corrupt is None:
        pytest.skip(f"{backend.name}: an in-process dict has no raw storage to corrupt")
    store = backend.store()
    store.put(rec(backend, "bad", b"payload"))
    store.put(rec(backend, "good", b"payload"))
    corrupt(store, "bad")
    assert store.get("bad") is None
    assert store.stats.corrupt_reads == 1
    assert store.get("bad") is None  # deleted: a second read is a plain miss
    assert store.stats.corrupt_reads == 1
    assert store.get("good") is not None
    assert live_keys(store) == {"good"}


def test_corrupt_metadata_leaves_no_index_residue(backend: Backend) -> None:
    if backend.corrupt_meta is None:
        pytest.skip(f"{backend.name}: an in-process dict has no raw storage to corrupt")
    store = backend.store()
    store.put(rec(backend, "bad", tenant="t", tags=frozenset({"x"})))
    store.put(rec(backend, "good", tenant="t", tags=frozenset({"x"})))
    backend.corrupt_meta(store, "bad")
    assert store.get("bad") is None and store.stats.corrupt_reads == 1
    assert live_keys(store, Match(tenant="t", tag="x")) == {"good"}
    assert live_keys(store, Match(tenant="t")) == {"good"}
    assert len(store) == 1
    if backend.index_members is not None:
        assert backend.index_members(store, "tenant:t") == {"good"}
        assert backend.index_members(store, "tag:x") == {"good"}


def test_corrupt_record_is_skipped_by_scan(backend: Backend) -> None:
    if backend.corrupt_value is None:
        pytest.skip(f"{backend.name}: an in-process dict has no raw storage to corrupt")
    store = backend.store()
    for i in range(5):
        store.put(rec(backend, f"k{i}", tenant="t"))
    backend.corrupt_value(store, "k2")
    assert live_keys(store, Match(tenant="t")) == {"k0", "k1", "k3", "k4"}
    assert store.stats.corrupt_reads == 1


@pytest.mark.parametrize("bad", [None, "", 42, b"bytes"])
def test_bad_keys_raise_config_error(backend: Backend, bad: object) -> None:
    store = backend.store()
    for operation in (store.get, store.peek, store.delete):
        with pytest.raises(ConfigError, match="`key`"):
            operation(bad)  # type: ignore[arg-type]


def test_put_rejects_non_records(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises((ConfigError, TypeError, AttributeError)):
        store.put({"key": "k", "value": b"v"})  # type: ignore[arg-type]


@given(
    key=st.text(min_size=1, max_size=20),
    value=st.binary(max_size=64),
    tenant=st.text(min_size=1, max_size=8),
    tags=st.frozensets(st.text(max_size=5), max_size=3),
    created=st.floats(0, 2e9),
    ttl=st.none() | st.floats(0, 1e6),
)
def test_stored_checksum_equals_record_checksum(
    key: str, value: bytes, tenant: str, tags: frozenset[str], created: float, ttl: float | None
) -> None:
    """The backends verify over the stored metadata text; that must be the record's own checksum."""
    r = Record(
        key=key,
        value=value,
        tenant=tenant,
        tags=tags,
        created=created,
        expires=None if ttl is None else created + ttl,
    )
    assert stored_checksum(r.key, r.meta_json(), r.value) == r.checksum()
    assert decode_verified(r.key, r.value, r.meta_json(), r.checksum(), 3) == r.with_hits(3)
    assert decode_verified(r.key, r.value + b"!", r.meta_json(), r.checksum(), 0) is None


# -- stateful: every store behaves like a dict model -------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
TAGS = st.frozensets(st.sampled_from(["x", "y", "z"]), max_size=2)
MATCH = st.builds(
    Match,
    tenant=st.none() | st.sampled_from(["t1", "t2"]),
    user=st.none() | st.sampled_from(["", "u1"]),
    tag=st.none() | st.sampled_from(["x", "y"]),
    model=st.none() | st.sampled_from(["m1", "m2"]),
).filter(lambda m: not m.empty)


class StoreMachine(RuleBasedStateMachine):
    """Compares a store with a dict of records plus hit counts, under puts, gets, deletes, purges, time."""

    backend: Backend

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, Record] = {}
        self.created = 0

    @initialize()
    def open_store(self) -> None:
        self.store = self.backend.store()

    def _live(self) -> dict[str, Record]:
        now = self.backend.now()
        return {k: r for k, r in self.model.items() if not r.expired(now)}

    @rule(
        key=KEYS,
        value=st.binary(max_size=64),
        tenant=st.sampled_from(["t1", "t2"]),
        user=st.sampled_from(["", "u1"]),
        tags=TAGS,
        model=st.sampled_from(["m1", "m2"]),
        ttl=st.none() | st.sampled_from([5.0, 50.0]),
    )
    def put(
        self,
        key: str,
        value: bytes,
        tenant: str,
        user: str,
        tags: frozenset[str],
        model: str,
        ttl: float | None,
    ) -> None:
        if self.backend.clock is None:
            ttl = None  # real-time backends: expiry has its own short-TTL tests
        now = self.backend.now()
        self.created += 1
        r = Record(
            key=key,
            value=value,
            tenant=tenant,
            user=user,
            tags=tags,
            model=model,
            created=now + self.created * 1e-3,
            expires=None if ttl is None else now + ttl,
        )
        self.store.put(r)
        self.model[key] = r

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        expected = self._live().get(key)
        assert self.store.get(key) == expected
        if expected is not None:
            self.model[key] = expected.with_hits(expected.hits + 1)
        else:
            self.model.pop(key, None)  # a get drops an expired record it finds

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        existed = key in self.model
        assert self.store.delete(key) == existed or (existed and key not in self._live())
        self.model.pop(key, None)

    @rule(where=MATCH)
    def purge(self, where: Match) -> None:
        doomed = {k for k, r in self._live().items() if where.matches(r)}
        assert self.store.purge(where) == len(doomed)
        for k in doomed:
            del self.model[k]

    @rule()
    def clear(self) -> None:
        assert self.store.clear() == len(self._live())
        self.model.clear()

    @rule(seconds=st.sampled_from([1.0, 10.0, 100.0]))
    def advance(self, seconds: float) -> None:
        if self.backend.clock is not None:
            self.backend.clock.advance(seconds)

    @rule()
    def expire(self) -> None:
        if self.backend.clock is None:
            return
        live = self._live()
        assert self.store.expire() == len(self.model) - len(live)
        self.model = live

    @invariant()
    def same_records(self) -> None:
        if hasattr(self, "store"):
            assert {r.key: r for r in self.store.scan()} == self._live()


def test_store_behaves_like_a_dict(backend: Backend) -> None:
    machine = type(
        f"StoreMachine_{backend.name}_{uuid.uuid4().hex[:4]}", (StoreMachine,), {"backend": backend}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


# -- SQLite only: buffered hit counts reach the file -------------------------------------------------------


def _hits_on_disk(path: Path, key: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT hits FROM records WHERE key = ?", (key,)).fetchone()[0])
    finally:
        conn.close()


def test_sqlite_hits_flush_at_threshold_interval_and_close(tmp_path: Path) -> None:
    path = tmp_path / "hits.db"
    store = SQLiteStore(path, hit_flush_threshold=3, hit_flush_interval_s=3600)
    store.put(Record(key="k", value=b"v"))
    store.get("k")
    store.get("k")
    assert _hits_on_disk(path, "k") == 0  # buffered
    store.get("k")
    assert _hits_on_disk(path, "k") == 3  # the third hit reached the threshold
    store.get("k")
    store.close()
    assert _hits_on_disk(path, "k") == 4  # close flushes the rest

    timed = SQLiteStore(path, hit_flush_threshold=1000, hit_flush_interval_s=0.05)
    timed.get("k")
    deadline = time.monotonic() + 10
    while _hits_on_disk(path, "k") != 5 and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for the background flush, not timing it
    assert _hits_on_disk(path, "k") == 5
    timed.close()


def test_sqlite_unclosed_store_is_collectable_and_its_flusher_stops(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "gc.db", hit_flush_interval_s=0.01)
    store.put(Record(key="k", value=b"v"))
    store.get("k")
    flusher = store._flusher
    assert flusher is not None and flusher.is_alive()
    ref = weakref.ref(store)
    del store
    gc.collect()
    assert ref() is None
    flusher.join(timeout=10)
    assert not flusher.is_alive()
