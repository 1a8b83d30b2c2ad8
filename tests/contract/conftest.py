"""Backends for the store contract suite. Add a backend by adding a `Backend` and a fixture param.

Each `Backend` knows how to open a fresh store, how time moves for it (an injected `ManualClock`, or real
time where the server's clock rules, as in Redis), and how to corrupt a stored record by writing the raw
backend directly.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from cachelm.clock import ManualClock
from cachelm.crypto import Keyring
from cachelm.store import EncryptedStore, MemoryStore, SQLiteStore, Store
from cachelm.store.redis import RedisStore


@dataclass
class Backend:
    """A way to open stores of one kind for a test, and to reach under them."""

    name: str
    open: Callable[[], Store]
    # Seconds a short TTL lasts for this backend: instant with a manual clock, real time for Redis.
    ttl: float
    clock: ManualClock | None
    corrupt_value: Callable[[Store, str], None] | None = None
    corrupt_meta: Callable[[Store, str], None] | None = None
    # Members of one secondary index ("tenant:t", "tag:x"), for backends that keep such indexes.
    index_members: Callable[[Store, str], set[str]] | None = None
    opened: list[Store] = field(default_factory=list)

    def store(self) -> Store:
        s = self.open()
        self.opened.append(s)
        return s

    def now(self) -> float:
        return self.clock() if self.clock is not None else time.time()

    def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        for s in self.opened:
            if isinstance(s, RedisStore):
                s.clear()  # namespaced keys of a shared server
            s.close()


def _sqlite_exec(store: Store, sql: str, *params: object) -> None:
    if isinstance(store, EncryptedStore):
        store = store.inner
    assert isinstance(store, SQLiteStore)
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute(sql, params).rowcount == 1
        conn.commit()
    finally:
        conn.close()


def _redis_raw(store: Store) -> tuple[redis.Redis, str]:
    assert isinstance(store, RedisStore)
    return store.client, store.namespace


def memory_backend(tmp_path: Path, redis_url: str, namespace: str) -> Backend:
    clock = ManualClock(1_000_000.0)
    return Backend(name="memory", open=lambda: MemoryStore(clock=clock), ttl=10.0, clock=clock)


def sqlite_backend(tmp_path: Path, redis_url: str, namespace: str) -> Backend:
    clock = ManualClock(1_000_000.0)

    def corrupt_value(store: Store, key: str) -> None:
        _sqlite_exec(store, "UPDATE records SET value = value || x'00' WHERE key = ?", key)

    def corrupt_meta(store: Store, key: str) -> None:
        _sqlite_exec(store, "UPDATE records SET meta = '{not json' WHERE key = ?", key)

    return Backend(
        name="sqlite",
        open=lambda: SQLiteStore(tmp_path / f"{uuid.uuid4().hex}.db", clock=clock),
        ttl=10.0,
        clock=clock,
        corrupt_value=corrupt_value,
        corrupt_meta=corrupt_meta,
    )


def redis_backend(tmp_path: Path, redis_url: str, namespace: str) -> Backend:
    def corrupt_value(store: Store, key: str) -> None:
        client, ns = _redis_raw(store)
        client.hset(f"{ns}:r:{key}", "v", b"flipped bits")

    def corrupt_meta(store: Store, key: str) -> None:
        client, ns = _redis_raw(store)
        client.set(f"{ns}:m:{key}", b"{not json")

    def index_members(store: Store, index: str) -> set[str]:
        client, ns = _redis_raw(store)
        return {bytes(m).decode() for m in client.smembers(f"{ns}:ix:{index}")}  # type: ignore[arg-type]

    # The server's clock decides expiry (PEXPIREAT), so TTL tests use short real TTLs.
    return Backend(
        name="redis",
        open=lambda: RedisStore.from_url(redis_url, namespace=f"{namespace}{uuid.uuid4().hex[:6]}"),
        ttl=0.4,
        clock=None,
        corrupt_value=corrupt_value,
        corrupt_meta=corrupt_meta,
        index_members=index_members,
    )


def encrypted_sqlite_backend(tmp_path: Path, redis_url: str, namespace: str) -> Backend:
    """EncryptedStore over SQLite: the wrapper must keep the whole contract too."""
    backend = sqlite_backend(tmp_path, redis_url, namespace)
    plain_open, keyring = backend.open, Keyring.generate()
    backend.name = "sqlite+aes"
    backend.open = lambda: EncryptedStore(plain_open(), keyring)
    return backend


BACKENDS: dict[str, Callable[[Path, str, str], Backend]] = {
    "memory": memory_backend,
    "sqlite": sqlite_backend,
    "sqlite+aes": encrypted_sqlite_backend,
    "redis": redis_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Backend]:
    # redis_url is requested lazily so memory/sqlite runs never start a Redis server.
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    b = BACKENDS[request.param](tmp_path, redis_url, namespace)
    yield b
    b.close()
