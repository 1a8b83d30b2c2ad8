"""No plaintext prompt or answer bytes at rest: scan the raw SQLite files and a Redis dump.

Each test first writes the same data *without* encryption and shows the scan finds the plaintext, so the
scan is proven able to fail; then writes it through `EncryptedStore` and shows it finds nothing. Metadata
(tenant, user, tags, model) stays in clear text by design (purges need it) and is not scanned for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cachelm.crypto import Keyring
from cachelm.store import EncryptedStore, Record, SQLiteStore, Store
from cachelm.store.redis import RedisStore

PROMPTS = [f"PROMPT-zebra-{i}: what is the secret recipe number {i}?" for i in range(20)]
ANSWERS = [f"ANSWER-quokka-{i}: the secret ingredient is saffron #{i}" for i in range(20)]
NEEDLES = [s.encode() for s in (*PROMPTS, *ANSWERS)] + [b"zebra", b"quokka", b"saffron"]


def _write(store: Store) -> None:
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        # A cached chat response as the exact cache stores it: the request and the answer, as JSON bytes.
        value = json.dumps({"request": {"messages": [{"role": "user", "content": prompt}]}, "answer": answer})
        store.put(
            Record(key=f"{i:064x}", value=value.encode(), tenant="acme", user="u1", tags=frozenset({"t"}))
        )
    # Large values too (an overflow-page path in SQLite, a big hash field in Redis).
    store.put(Record(key="f" * 64, value=(ANSWERS[0] * 500).encode(), tenant="acme"))


def _found(blob: bytes) -> list[bytes]:
    return [n for n in NEEDLES if n in blob]


def _sqlite_bytes(path: Path) -> bytes:
    """The database file and its WAL and shared-memory files, as raw bytes."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def _sqlite_scan(tmp_path: Path, keyring: Keyring | None) -> list[bytes]:
    path = tmp_path / ("enc.db" if keyring else "plain.db")
    inner = SQLiteStore(path)
    store: Store = EncryptedStore(inner, keyring) if keyring else inner
    _write(store)
    assert store.get(f"{0:064x}") is not None  # readable through the store
    raw_while_open = _sqlite_bytes(path)  # the -wal file holds the fresh pages before a checkpoint
    assert Path(str(path) + "-wal").exists()
    store.close()
    return _found(raw_while_open + _sqlite_bytes(path))


def test_sqlite_plaintext_is_visible_without_encryption(tmp_path: Path) -> None:
    assert len(_sqlite_scan(tmp_path, None)) == len(NEEDLES)


def test_sqlite_file_and_wal_hold_no_plaintext_with_encryption(tmp_path: Path) -> None:
    assert _sqlite_scan(tmp_path, Keyring.generate()) == []


def _redis_dump(client: redis.Redis, namespace: str) -> Iterator[bytes]:
    """DUMP (Redis's own serialisation) and the raw hash fields of every key of the namespace."""
    for name in client.scan_iter(match=f"{namespace}*:*"):
        dumped = client.dump(name)
        assert dumped is not None
        yield name + b"\n" + dumped
        if client.type(name) == b"hash":
            fields: dict[bytes, bytes] = client.hgetall(name)  # type: ignore[assignment]
            yield b"".join(k + v for k, v in fields.items())


def _redis_scan(redis_url: str, namespace: str, keyring: Keyring | None) -> list[bytes]:
    inner = RedisStore.from_url(redis_url, namespace=namespace + ("e" if keyring else "p"))
    store: Store = EncryptedStore(inner, keyring) if keyring else inner
    try:
        _write(store)
        record = store.get(f"{1:064x}")
        assert record is not None and ANSWERS[1].encode() in record.value  # readable through the store
        dump = b"".join(_redis_dump(inner.client, inner.namespace))
        assert len(dump) > 500 * len(ANSWERS[0])  # the dump really covers the records (the large value)
        return _found(dump)
    finally:
        inner.clear()
        inner.close()


def test_redis_plaintext_is_visible_without_encryption(redis_url: str, namespace: str) -> None:
    assert len(_redis_scan(redis_url, namespace, None)) == len(NEEDLES)


def test_redis_dump_holds_no_plaintext_with_encryption(redis_url: str, namespace: str) -> None:
    assert _redis_scan(redis_url, namespace, Keyring.generate()) == []


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_envelope_moved_between_records_at_rest_is_rejected(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Copying one record's ciphertext over another's inside the backend reads as a counted miss."""
    inner: Store
    if backend == "sqlite":
        inner = SQLiteStore(tmp_path / "swap.db")
    else:
        inner = RedisStore.from_url(
            request.getfixturevalue("redis_url"), namespace=request.getfixturevalue("namespace")
        )
    store = EncryptedStore(inner, Keyring.generate())
    try:
        store.put(Record(key="a", value=b"answer for a", tenant="acme"))
        store.put(Record(key="b", value=b"answer for b", tenant="acme"))
        sealed_a = inner.peek("a")
        assert sealed_a is not None
        # Rewrite b with a's envelope through the inner store (valid checksum, wrong binding).
        inner.put(Record(key="b", value=sealed_a.value, tenant="acme"))
        assert store.get("b") is None
        assert store.stats.corrupt_reads == 1
        assert store.get("a") is not None and store.get("a").value == b"answer for a"  # type: ignore[union-attr]
    finally:
        if isinstance(inner, RedisStore):
            inner.clear()
        store.close()
