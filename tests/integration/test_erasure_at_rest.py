"""Erased data leaves the disk, and the persisted semantic index is encrypted at rest: scan the raw files.

Every scan is first shown able to find what it looks for (the same bytes before the erasure, or the data of
a user who is kept), then shown to find nothing of what was erased or sealed. The files are scanned while
the store or index is still open (a live server's files), and again after it closed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cachelm.crypto import Keyring
from cachelm.errors import BackendError, ConfigError
from cachelm.semantic import FlatIndex, HNSWConfig, HNSWIndex, IndexEntry
from cachelm.store import Match, Record, SQLiteStore
from tests.at_rest import raw_bytes

DIM = 16
CONFIG = HNSWConfig(min_graph_size=16, expansion_search=256)


def _found(blob: bytes, needles: list[bytes]) -> list[bytes]:
    return [n for n in needles if n in blob]


# ---- the SQLite store ------------------------------------------------------------------------------------


def _answers(user: str) -> list[bytes]:
    return [f"ANSWER-{user}-{i}: the diagnosis is confidential #{i}".encode() for i in range(10)]


def _fill(store: SQLiteStore) -> None:
    for user in ("alice", "bob"):
        for i, value in enumerate(_answers(user)):
            store.put(Record(key=f"{user}{i:060x}", value=value, tenant="acme", user=user))
        # a large value too: it lives in overflow pages
        store.put(Record(key=f"{user}big", value=_answers(user)[0] * 400, tenant="acme", user=user))


def test_sqlite_purge_leaves_no_byte_of_the_erased_user_on_disk(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cache.db")
    _fill(store)
    store.close()  # the records now sit in the database file itself, not only in the WAL
    store = SQLiteStore(tmp_path / "cache.db")
    alice, bob = _answers("alice"), _answers("bob")
    assert _found(raw_bytes(tmp_path), alice) == alice  # the scan finds them before the erasure
    assert store.purge(Match(tenant="acme", user="alice")) == 11
    raw = raw_bytes(tmp_path)  # still open, as a running server's files are
    assert _found(raw, alice) == []
    assert _found(raw, bob) == bob  # the kept user's records are still there, in the same files
    store.close()
    assert _found(raw_bytes(tmp_path), alice) == []


def test_sqlite_purge_blocked_by_a_reader_says_so_and_a_retry_finishes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cache.db", busy_timeout_s=0.2)
    _fill(store)
    reader = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 22  # holds this snapshot
    with pytest.raises(BackendError, match="run it again"):
        store.purge(Match(tenant="acme", user="alice"))
    assert [r.user for r in store.scan()].count("alice") == 0  # the records themselves are deleted
    reader.execute("COMMIT")
    reader.close()
    assert store.purge(Match(tenant="acme", user="alice")) == 0  # the retry: nothing to delete, WAL emptied
    assert _found(raw_bytes(tmp_path), _answers("alice")) == []
    store.close()


# ---- the persisted semantic index ------------------------------------------------------------------------


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _entries(user: str, vectors: np.ndarray) -> list[IndexEntry]:
    # One tenant and one context: both users' vectors share a partition (a graph at 16 entries and more).
    return [
        IndexEntry(
            entry_id=f"{user}{i}", tenant="acme", context_key="c", response_key=f"{user}-r{i}", vector=v
        )
        for i, v in enumerate(vectors)
    ]


def _needles(vectors: np.ndarray) -> list[bytes]:
    return [np.asarray(v, dtype="<f4").tobytes() for v in vectors]


def _assert_answers_like_flat(index: HNSWIndex, kept: list[IndexEntry], queries: np.ndarray) -> None:
    reference = FlatIndex(DIM)
    reference.add(kept)
    assert sorted(index.entry_ids()) == sorted(e.entry_id for e in kept)
    for q in queries:
        got = index.search(q, tenant="acme", context_key="c", k=3)
        want = reference.search(q, tenant="acme", context_key="c", k=3)
        assert [n.entry_id for n in got] == [n.entry_id for n in want]


def _assert_serves_only(index: HNSWIndex, kept: list[IndexEntry], removed: list[IndexEntry]) -> None:
    """Every kept entry finds itself first; no removed entry is ever returned (graph libraries are
    approximate and usearch builds in parallel, so ranks below the first are not compared)."""
    assert sorted(index.entry_ids()) == sorted(e.entry_id for e in kept)
    for e in kept:
        assert index.search(e.vector, tenant="acme", context_key="c", k=1)[0].entry_id == e.entry_id
    gone = {e.entry_id for e in removed}
    for e in removed:
        assert not gone & {n.entry_id for n in index.search(e.vector, tenant="acme", context_key="c", k=5)}


@pytest.mark.parametrize("backend", ["hnswlib", "usearch", "faiss"])
def test_removed_vectors_leave_memory_table_and_snapshots(tmp_path: Path, backend: str) -> None:
    config = HNSWConfig(backend=backend, min_graph_size=16, expansion_search=256)
    alice_v, bob_v = _vectors(40, seed=1), _vectors(40, seed=2)
    alice, bob = _entries("alice", alice_v), _entries("bob", bob_v)
    index = HNSWIndex(DIM, config=config, path=tmp_path / "cache.db")
    index.add(alice + bob)
    index.flush()  # a graph snapshot now holds both users' vectors too
    assert index.graph_partitions() == 1
    assert _found(raw_bytes(tmp_path), _needles(alice_v)) == _needles(alice_v)

    # One entry (hnswlib overwrites it in place), then the rest (a rebuild: more than 1/24 of the graph).
    assert index.remove_response_keys("acme", [alice[0].response_key]) == 1
    assert _found(raw_bytes(tmp_path), _needles(alice_v[:1])) == []
    index.flush()
    assert _found(raw_bytes(tmp_path), _needles(alice_v[:1])) == []
    assert index.remove_response_keys("acme", [e.response_key for e in alice[1:]]) == 39
    assert _found(raw_bytes(tmp_path), _needles(alice_v)) == []  # table, WAL and snapshot, while open
    assert _found(raw_bytes(tmp_path), _needles(bob_v)) == _needles(bob_v)
    _assert_serves_only(index, bob, alice)
    index.flush()  # the graph written from memory: the removed vectors were scrubbed there too
    assert _found(raw_bytes(tmp_path), _needles(alice_v)) == []
    index.close()
    again = HNSWIndex(DIM, config=config, path=tmp_path / "cache.db")
    assert again.recovery["loaded"] == 1
    _assert_serves_only(again, bob, alice)
    again.close()


def test_sealed_index_holds_no_vector_and_reopens_from_its_snapshot(tmp_path: Path) -> None:
    keyring = Keyring.generate("k1")
    vectors = _vectors(40, seed=3)
    data = _entries("alice", vectors)
    index = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db", keyring=keyring)
    index.add(data)
    index.flush()
    assert _found(raw_bytes(tmp_path), _needles(vectors)) == []
    index.close()
    assert _found(raw_bytes(tmp_path), _needles(vectors)) == []

    with pytest.raises(ConfigError, match="is encrypted"):
        HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db")
    with pytest.raises(ConfigError, match="none of the 40 entries"):
        HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db", keyring=Keyring.generate("k1"))
    # Neither refusal deleted anything, and a rotated keyring (old key kept) still opens the index.
    rotated = Keyring({"k1": keyring._keys["k1"], "k2": Keyring.generate()._keys["k1"]})
    again = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db", keyring=rotated)
    assert again.recovery == {"loaded": 1, "rebuilt": 0, "reconciled": 0, "corrupt": 0}
    _assert_answers_like_flat(again, data, _vectors(10, seed=4))
    again.close()


def test_a_plaintext_index_is_sealed_in_place_when_a_keyring_is_given(tmp_path: Path) -> None:
    vectors = _vectors(40, seed=5)
    data = _entries("alice", vectors)
    plain = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db")
    plain.add(data)
    plain.close()
    assert _found(raw_bytes(tmp_path), _needles(vectors)) == _needles(vectors)

    sealed = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db", keyring=Keyring.generate())
    assert _found(raw_bytes(tmp_path), _needles(vectors)) == []  # rows sealed, plaintext snapshot dropped
    assert sealed.recovery["rebuilt"] == 1  # the plaintext snapshot is not trusted under a keyring
    _assert_answers_like_flat(sealed, data, _vectors(10, seed=6))
    sealed.close()
    assert _found(raw_bytes(tmp_path), _needles(vectors)) == []


def test_a_tampered_sealed_entry_is_dropped_and_counted(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    data = _entries("alice", _vectors(20, seed=7))
    index = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db", keyring=keyring)
    index.add(data)
    index.close()
    db = sqlite3.connect(tmp_path / "cache.db.semantic.sqlite", isolation_level=None)
    (blob,) = db.execute("SELECT vector FROM entries WHERE entry_id='alice3'").fetchone()
    db.execute("UPDATE entries SET vector=? WHERE entry_id='alice3'", (blob[:-1] + bytes([blob[-1] ^ 1]),))
    # ... and one entry's envelope moved onto another entry (valid ciphertext, wrong binding)
    (other,) = db.execute("SELECT vector FROM entries WHERE entry_id='alice5'").fetchone()
    db.execute("UPDATE entries SET vector=? WHERE entry_id='alice6'", (other,))
    db.close()
    again = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.db", keyring=keyring)
    assert again.recovery["corrupt"] == 2
    kept = [e for e in data if e.entry_id not in ("alice3", "alice6")]
    _assert_answers_like_flat(again, kept, _vectors(10, seed=8))
    again.close()


def test_keyring_needs_a_persisted_index() -> None:
    with pytest.raises(ConfigError, match="`keyring` needs `path`"):
        HNSWIndex(DIM, keyring=Keyring.generate())
    with pytest.raises(ConfigError, match="`keyring` must be a Keyring"):
        HNSWIndex(DIM, path="/tmp/x.db", keyring="k1:abc")  # type: ignore[arg-type]
