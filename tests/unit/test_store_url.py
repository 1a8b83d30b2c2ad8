"""open_store(url): every scheme, settings in the query string, clear errors for bad URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

import cachelm.store
from cachelm.clock import ManualClock
from cachelm.crypto import Keyring
from cachelm.errors import ConfigError
from cachelm.store import EncryptedStore, MemoryStore, Record, SQLiteStore, open_store
from cachelm.store.redis import RedisStore
from cachelm.store.url import sqlite_file


def test_memory() -> None:
    clock = ManualClock(5.0)
    store = open_store("memory://", clock=clock)
    assert isinstance(store, MemoryStore) and store.clock is clock


def test_sqlite_absolute_path_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "abs.db"
    store = open_store(f"sqlite:///{path}?synchronous=FULL&hit_flush_threshold=7&max_size_bytes=1000000")
    assert isinstance(store, SQLiteStore) and Path(store.path) == path
    assert store.settings.synchronous == "FULL"
    assert store.settings.hit_flush_threshold == 7 and store.settings.max_size_bytes == 1_000_000
    store.put(Record(key="k", value=b"v"))
    store.close()
    assert path.exists()
    # Reopened without settings, the stored ones come back; an explicit one overrides and is stored.
    again = open_store(f"sqlite:///{path}", hit_flush_interval_s=0.5)
    assert isinstance(again, SQLiteStore) and again.settings.synchronous == "FULL"
    assert again.settings.hit_flush_interval_s == 0.5 and again.peek("k") is not None
    again.close()


def test_sqlite_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite://relative.db")
    assert isinstance(store, SQLiteStore)
    store.close()
    assert (tmp_path / "relative.db").exists()


def test_sqlite_file_names_the_file_every_form_opens(tmp_path: Path) -> None:
    """The one parser the store, the CLI and the proxy use to find the file (the semantic index sits beside
    it): the SQLAlchemy spelling, relative paths and settings in the query string alike."""
    assert sqlite_file(f"sqlite:///{tmp_path}/a.db?synchronous=FULL") == f"{tmp_path}/a.db"
    assert sqlite_file(f"sqlite:////{tmp_path}/a.db") == f"{tmp_path}/a.db"
    assert sqlite_file("sqlite://relative.db") == "relative.db"
    assert sqlite_file("memory://") is None and sqlite_file("redis://localhost:6379/0") is None
    with pytest.raises(ConfigError, match="names no database file"):
        sqlite_file("sqlite://")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "names no database file"),
        ("sqlite:///x.db?colour=blue", "unknown sqlite setting 'colour'"),
        ("sqlite:///x.db?hit_flush_threshold=many", "must be a int"),
        ("sqlite:///x.db?synchronous=SOMETIMES", "`synchronous` must be one of"),
        ("sqlite:///x.db?hit_flush_threshold=0", "`hit_flush_threshold`"),
        ("memory://somewhere", "memory:// takes no path"),
        ("mongodb://localhost/db", "unknown scheme 'mongodb'"),
        ("just-a-path.db", "must look like scheme://"),
        ("redis://localhost:6379/0?namespace=bad:ns", "`namespace`"),
    ],
)
def test_bad_urls_raise_config_error_naming_the_problem(url: str, message: str, tmp_path: Path) -> None:
    url = url.replace("///x.db", f"///{tmp_path}/x.db")
    with pytest.raises(ConfigError, match=message) as info:
        open_store(url)
    if "scheme" in message:
        assert url in str(info.value)


def test_unknown_sqlite_keyword_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown sqlite setting"):
        open_store(f"sqlite:///{tmp_path}/x.db", colour="blue")


@pytest.mark.parametrize(
    ("url", "namespace", "timeout"),
    [
        ("redis://127.0.0.1:6379/3?namespace=app1", "app1", 1.0),
        ("redis://:secret@127.0.0.1:6379/0?socket_timeout=0.25", "cachelm", 0.25),
        ("rediss://cache.example.com:6380/0?namespace=tls", "tls", 1.0),
        ("unix:///run/redis/redis.sock?db=2&namespace=sock", "sock", 1.0),
    ],
)
def test_redis_urls(url: str, namespace: str, timeout: float) -> None:
    # Constructing the client does not connect, so unreachable hosts are fine here.
    store = open_store(url)
    assert isinstance(store, RedisStore) and store.namespace == namespace
    kwargs = store.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == timeout
    assert "secret" not in store.url
    if url.startswith("unix"):
        assert kwargs["path"] == "/run/redis/redis.sock" and kwargs["db"] == 2
    store.close()


def test_redis_url_against_the_real_server(redis_url: str, namespace: str) -> None:
    sep = "&" if "?" in redis_url else "?"
    store = open_store(f"{redis_url}{sep}namespace={namespace}")
    try:
        store.put(Record(key="k", value=b"v"))
        assert store.get("k") is not None
    finally:
        store.clear()
        store.close()


def test_keyring_wraps_in_encrypted_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/e.db", keyring=Keyring.generate())
    assert isinstance(store, EncryptedStore) and isinstance(store.inner, SQLiteStore)
    store.put(Record(key="k", value=b"plain"))
    assert store.get("k").value == b"plain"  # type: ignore[union-attr]
    assert store.inner.peek("k").value != b"plain"  # type: ignore[union-attr]
    store.close()


def test_store_package_all_is_sorted_and_importable() -> None:
    assert cachelm.store.__all__ == sorted(cachelm.store.__all__)
    for name in cachelm.store.__all__:
        assert hasattr(cachelm.store, name)
