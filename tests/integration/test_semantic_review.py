"""Review of the semantic-cache and governance layers: each test pins a defect that was found and fixed.

Real components throughout: the hashing embedder, in-process and persisted indexes, SQLite stores, and a
real PostgreSQL + pgvector (`pg_url`). No timing assertions: where a call could block, a generous join
bound only tells a blocked call from a finished one.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachelm.errors import BackendError, ConfigError
from cachelm.governance import Governance
from cachelm.response.exact import ExactCache
from cachelm.semantic import (
    BoundedErrorConfig,
    BoundedErrorPolicy,
    EmbeddingCache,
    FlatIndex,
    HashingEmbedder,
    HNSWConfig,
    HNSWIndex,
    IndexEntry,
    PgVectorIndex,
    SemanticCache,
    StaticThreshold,
    VectorIndex,
    calibrate_threshold,
)
from cachelm.semantic.embedder import Vectors
from cachelm.store import MemoryStore
from cachelm.store.base import Match
from cachelm.store.sqlite import SQLiteStore
from tests.at_rest import raw_bytes
from tests.unit.test_governance import answer

DIM = 16


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def entry(entry_id: str, vector: np.ndarray, *, rkey: str, tenant: str = "t", ctx: str = "c") -> IndexEntry:
    return IndexEntry(entry_id=entry_id, tenant=tenant, context_key=ctx, response_key=rkey, vector=vector)


def chat(text: str, *, system: str = "be brief") -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return {"model": "gpt-4o-mini", "temperature": 0, "messages": messages}


# ---- index consistency: one `add` naming the same entry id twice ----------------------------------------


@pytest.fixture(params=["flat", "hnsw", "hnsw-persisted"])
def in_process_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    index: VectorIndex
    if request.param == "flat":
        index = FlatIndex(DIM)
    elif request.param == "hnsw":
        index = HNSWIndex(DIM)
    else:
        index = HNSWIndex(DIM, path=tmp_path / "cache.db")
    yield index
    index.close()


def test_a_batch_naming_one_entry_id_twice_keeps_only_the_last_and_removes_it(
    in_process_index: VectorIndex,
) -> None:
    """`add` of an existing id replaces it; inside one batch the last occurrence must win (as pgvector's
    upsert does). The in-process indexes kept the first one as an orphan that `remove` could never reach:
    its stale answer stayed servable after the entry was removed."""
    old, new = unit(2, seed=1)
    in_process_index.add([entry("x", old, rkey="stale"), entry("x", new, rkey="fresh")])
    assert len(in_process_index) == 1
    found = in_process_index.search(old, tenant="t", context_key="c", k=5)
    assert [(n.entry_id, n.response_key) for n in found] == [("x", "fresh")]
    assert in_process_index.remove(["x"]) == 1
    assert in_process_index.search(old, tenant="t", context_key="c", k=5) == []
    assert len(in_process_index) == 0


# ---- vectors that are not unit vectors -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_query_vector_is_a_config_error_naming_vector(
    in_process_index: VectorIndex, bad: float
) -> None:
    in_process_index.add([entry("a", unit(1)[0], rkey="r")])
    query = np.full(DIM, bad, dtype=np.float32)
    with pytest.raises(ConfigError, match="`vector`"):
        in_process_index.search(query, tenant="t", context_key="c")
    cache = SemanticCache(
        embedder=HashingEmbedder(dim=DIM), index=in_process_index, rule=StaticThreshold(0.9)
    )
    with pytest.raises(ConfigError, match="`vector`"):
        cache.search_vector(query, tenant="t", context_key="c")
    with pytest.raises(ConfigError, match="`vector`"):
        cache.add_vector(query, tenant="t", context_key="c", response_key="r2", entry_id="b")


class UnnormalisedEmbedder:
    """A third-party embedder that returns raw (not unit-length) vectors, as many sentence models do
    without their normalisation step: here, hashed n-grams scaled by the text's length."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=64)

    @property
    def model_id(self) -> str:
        return "raw-ngrams-64"

    @property
    def dim(self) -> int:
        return 64

    def embed(self, texts: Sequence[str]) -> Vectors:
        scale = np.asarray([[1.0 + len(t)] for t in texts], dtype=np.float32)
        return (self.inner.embed(texts) * scale).astype(np.float32)


def test_similarity_is_a_cosine_even_when_the_embedder_does_not_normalise() -> None:
    """An inner product of raw vectors is not a cosine: two unrelated questions scored far above 1 and
    were served at any threshold."""
    embedder = UnnormalisedEmbedder()
    cache = SemanticCache(
        embedder=EmbeddingCache(MemoryStore(), embedder), index=FlatIndex(64), rule=StaticThreshold(0.9)
    )
    stored, unrelated = "How do I bake a cake at home?", "Where can I buy bread at home?"
    raw = embedder.inner.embed([stored, unrelated])
    assert 0.0 < float(raw[0] @ raw[1]) < 0.5  # two different questions, cosine far below the threshold
    cache.add(chat(stored), tenant="acme", response_key="bread")
    found = cache.search(chat(unrelated), tenant="acme")
    assert found.hit is None
    assert found.decision is not None
    paraphrase = cache.search(chat(stored), tenant="acme")  # the same question still hits
    assert paraphrase.hit is not None and paraphrase.hit.similarity == pytest.approx(1.0, abs=1e-5)


# ---- bad configuration of the decision rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_window", 0),
        ("frequency_window", -5),
        ("refit_every", 0),
        ("window", 100.5),
        ("delta", "0.02"),
        ("alpha", None),
        ("explore_rate", True),
        ("floor", 0.999),  # above the first candidate threshold: nothing could ever be certified
        ("seed", "7"),
    ],
)
def test_bounded_error_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"`{field}`"):
        BoundedErrorConfig(**{field: value})


@pytest.mark.parametrize(
    ("similarities", "labels", "kwargs", "named"),
    [
        ([0.9, float("nan"), 0.5], [1, 0, 0], {}, "similarities"),
        ([0.9, float("inf"), 0.5], [1, 0, 0], {}, "similarities"),
        (["a", "b"], [1, 0], {}, "similarities"),
        ([0.9, 0.8, 0.5], [1, 1, 0], {"objective": "precision", "alpha": 5.0}, "alpha"),
        ([0.9, 0.8, 0.5], [1, 1, 0], {"objective": "precision", "alpha": 0.0}, "alpha"),
        ([0.9, 0.8, 0.5], [1, 1, 0], {"target_precision": "high"}, "target_precision"),
    ],
)
def test_calibrate_threshold_rejects_bad_input_naming_the_argument(
    similarities: list[Any], labels: list[int], kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=f"`{named}`"):
        calibrate_threshold(similarities, labels, **kwargs)


def test_static_threshold_rejects_a_bool() -> None:
    with pytest.raises(ConfigError, match="`threshold`"):
        StaticThreshold(True)


# ---- the persisted HNSW index: erasure across a crash, corrupt rows ---------------------------------------


def _needles(vectors: np.ndarray) -> list[bytes]:
    return [np.asarray(v, dtype="<f4").tobytes() for v in vectors]


@pytest.mark.parametrize("backend", ["hnswlib", "usearch", "faiss"])
def test_a_snapshot_older_than_a_removal_does_not_bring_the_removed_vectors_back_to_disk(
    tmp_path: Path, backend: str
) -> None:
    """A crash between a removal's commit and the drop of the partition's snapshot leaves a snapshot that
    holds the removed vectors. Reopening reconciled the graph by *marking* them deleted, which keeps them
    in the graph's memory, and the next snapshot wrote them to disk again: erasure undone."""
    config = HNSWConfig(backend=backend, min_graph_size=16, expansion_search=256)
    home, aside = tmp_path / "index", tmp_path / "aside"
    home.mkdir()
    vectors = unit(60, seed=3)
    data = [entry(f"e{i}", v, rkey=f"r{i}") for i, v in enumerate(vectors)]
    index = HNSWIndex(DIM, config=config, path=home / "cache.db")
    index.add(data)
    index.flush()
    snap = home / "cache.db.semantic.hnsw"
    shutil.copytree(snap, aside)
    gone = [i for i in range(0, 60, 4)]
    index.remove([f"e{i}" for i in gone])
    index.close()
    shutil.rmtree(snap)
    shutil.copytree(aside, snap)  # as if the process had died before the stale snapshot was dropped
    shutil.rmtree(aside)
    erased = _needles(vectors[gone])
    assert [n for n in erased if n in raw_bytes(home)] == erased  # the scan can find them

    again = HNSWIndex(DIM, config=config, path=home / "cache.db")
    assert sorted(again.entry_ids()) == sorted(f"e{i}" for i in range(60) if i % 4)
    assert [n for n in erased if n in raw_bytes(home)] == []  # the stale snapshot is gone at once
    again.flush()
    assert [n for n in erased if n in raw_bytes(home)] == []
    again.close()
    assert [n for n in erased if n in raw_bytes(home)] == []
    kept = _needles(vectors[[i for i in range(60) if i % 4]])
    assert all(n in raw_bytes(home) for n in kept)


@pytest.mark.parametrize("column", ["entry_id", "tenant", "context_key", "response_key"])
def test_one_corrupt_row_is_dropped_and_counted_not_a_refusal_to_open(tmp_path: Path, column: str) -> None:
    index = HNSWIndex(DIM, path=tmp_path / "cache.db")
    vectors = unit(5, seed=4)
    index.add([entry(f"e{i}", v, rkey=f"r{i}") for i, v in enumerate(vectors)])
    index.close()
    db = sqlite3.connect(tmp_path / "cache.db.semantic.sqlite", isolation_level=None)
    db.execute(f"UPDATE entries SET {column}='' WHERE entry_id='e2'")
    db.close()
    again = HNSWIndex(DIM, path=tmp_path / "cache.db")
    try:
        assert again.recovery["corrupt"] == 1
        assert sorted(again.entry_ids()) == ["e0", "e1", "e3", "e4"]
        assert again.search(vectors[3], tenant="t", context_key="c")[0].entry_id == "e3"
    finally:
        again.close()
    with sqlite3.connect(tmp_path / "cache.db.semantic.sqlite") as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 4  # the bad row is gone


# ---- pgvector: a server that goes away or stalls is a miss, then service resumes --------------------------


def test_pgvector_reconnects_after_the_server_dropped_its_connection(pg_url: str, table: str) -> None:
    """A server restart or failover ends the index's connection. The lookup in flight may be a miss; the
    next ones must be served again, not fail until the process restarts."""
    import psycopg

    index = PgVectorIndex(pg_url, DIM, table=table)
    cache = SemanticCache(embedder=HashingEmbedder(dim=DIM), index=index, rule=StaticThreshold(0.9))
    request = chat("what is the capital of France?")
    try:
        cache.add(request, tenant="t", response_key="answer-1")
        with index._lock:
            (pid,) = index._conn.execute("SELECT pg_backend_pid()").fetchone()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        results = [cache.lookup(request, tenant="t") for _ in range(3)]
        assert cache.stats.errors <= 1  # at most the lookup that found the connection gone
        assert results[-1] is not None and results[-1].response_key == "answer-1"
        cache.add(chat("what is the capital of Spain?"), tenant="t", response_key="answer-2")
        assert len(index) == 2
    finally:
        index.close()


def test_pgvector_search_blocked_by_a_lock_becomes_a_miss(pg_url: str, table: str) -> None:
    """`VACUUM FULL` (the documented way to erase from pgvector) or any DDL holds an exclusive lock on the
    table; a lookup then waited for it with no limit, stalling the request behind it."""
    import psycopg

    index = PgVectorIndex(pg_url, DIM, table=table)  # the default: a bounded wait
    cache = SemanticCache(embedder=HashingEmbedder(dim=DIM), index=index, rule=StaticThreshold(0.9))
    request = chat("what is the capital of France?")
    cache.add(request, tenant="t", response_key="answer-1")
    found: list[Any] = []
    locker = psycopg.connect(pg_url, autocommit=True)
    try:
        locker.execute("BEGIN")
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: found.append(cache.lookup(request, tenant="t")), daemon=True)
        worker.start()
        worker.join(60)  # not a timing assertion: tells "blocked until the lock goes" from "gave up"
        assert not worker.is_alive(), "the lookup waited for the lock"
        assert found == [None] and cache.stats.errors == 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    hit = cache.lookup(request, tenant="t")
    assert hit is not None and hit.response_key == "answer-1"
    index.close()


def test_pgvector_removal_is_not_cut_by_the_statement_timeout(pg_url: str, table: str) -> None:
    """The timeout keeps lookups off a blocked table; an erasure must wait and finish, not roll back."""
    import psycopg

    index = PgVectorIndex(pg_url, DIM, table=table, statement_timeout=0.2)
    index.add([entry(f"e{i}", v, rkey=f"r{i}", tenant="gone") for i, v in enumerate(unit(5, seed=3))])
    removed: list[Any] = []
    locker = psycopg.connect(pg_url, autocommit=True)
    try:
        locker.execute("BEGIN")
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: removed.append(index.remove_tenant("gone")), daemon=True)
        worker.start()
        worker.join(1.0)  # five times the timeout: a bounded DELETE would have failed by now
        with pytest.raises(BackendError):  # a lookup in the same spot gives up
            index.search(unit(1, seed=4)[0], tenant="gone", context_key="c")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    worker.join(60)
    assert removed == [5] and len(index) == 0
    index.close()


def test_pgvector_statement_timeout_is_validated(pg_url: str) -> None:
    for bad in (0, -1.0, "5", True, float("nan")):
        with pytest.raises(ConfigError, match="`statement_timeout`"):
            PgVectorIndex(pg_url, DIM, table="never_created", statement_timeout=bad)


# ---- governance: a complaint about an answer whose entry is already gone ---------------------------------


def test_a_second_complaint_does_not_leave_a_veto_on_the_re_answered_question(tmp_path: Path) -> None:
    """Two paraphrases are reported bad in turn. The first report removes both (the second is its
    neighbour); the second report then vetoed an entry id that was no longer indexed, and the veto was
    never forgotten: the question's fresh answer could never be served by meaning again."""
    store = SQLiteStore(tmp_path / "cache.db")
    rule = BoundedErrorPolicy(BoundedErrorConfig(delta=0.05, seed=3))
    semantic = SemanticCache(
        embedder=EmbeddingCache(MemoryStore(), HashingEmbedder(dim=128)), index=FlatIndex(128), rule=rule
    )
    gov = Governance(ExactCache(store), semantic=semantic)
    first, second = chat("What is the capital of France?"), chat("what is the capital of france")
    for request in (first, second):
        assert gov.store(request, answer(request), tenant="acme") is not None
    report = gov.mark_bad(first, tenant="acme", similarity=0.8)
    assert len(report.entries) == 2  # the paraphrase went with it
    gov.mark_bad(second, tenant="acme", similarity=0.8)  # the user complains about that one too
    assert gov.store(second, answer(second, version="fixed"), tenant="acme") is not None

    for _ in range(1000):  # lookups with no candidate certify a threshold for the tenant
        rule.decide(None, entry_id=None, region="acme")
    assert rule.threshold("acme") == rule.threshold("acme")  # certified (not nan)
    found = semantic.search(second, tenant="acme")
    assert found.decision is not None
    assert found.decision.reason in ("above-threshold", "explore")
    store.close()


# ---- erasure: question vectors re-embedded by governance belong to the answer's user ----------------------


def _gov_on_one_store(store: SQLiteStore) -> tuple[Governance, EmbeddingCache]:
    """Answers, logged requests and cached question vectors in one store, as the proxy keeps them."""
    embeddings = EmbeddingCache(store, HashingEmbedder(dim=128))
    semantic = SemanticCache(embedder=embeddings, index=FlatIndex(128), rule=StaticThreshold(0.9))
    exact = ExactCache(store, model_revisions={"gpt-4o-mini": "r1"})
    return Governance(exact, semantic=semantic), embeddings


def _vectors_left(store: SQLiteStore, tenant: str) -> list[str]:
    return [r.user for r in store.scan(Match(tenant=tenant, tag="embedding"))]


def test_a_refreshed_entry_s_question_vector_goes_with_its_user_s_erasure(tmp_path: Path) -> None:
    """A refresh re-indexes each recomputed question. When its cached vector had expired (or been
    evicted), the vector was embedded again and stored as nobody's: erasing the user left it behind."""
    store = SQLiteStore(tmp_path / "cache.db")
    gov, embeddings = _gov_on_one_store(store)
    request = chat("What is the capital of France?")  # no `user` field: the proxy knows the user
    assert gov.store(request, answer(request), tenant="acme", user="alice") is not None
    assert _vectors_left(store, "acme") == ["alice"]
    store.delete(embeddings.key("What is the capital of France?", tenant="acme"))  # expired

    final = gov.refresh_on_model_change(
        "gpt-4o-mini", "r2", recompute=lambda r, e: answer(dict(r), version="v2"), budget=1
    ).result(timeout=60)
    assert final.refreshed == 1
    assert _vectors_left(store, "acme") == ["alice"]
    store.purge(Match(tenant="acme", user="alice"))  # erase alice
    assert _vectors_left(store, "acme") == []
    store.close()


def test_mark_bad_re_embeds_the_question_for_the_answer_s_user(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cache.db")
    gov, embeddings = _gov_on_one_store(store)
    bad, other = chat("What is the capital of France?"), chat("How do I bake bread?")
    assert gov.store(bad, answer(bad), tenant="acme", user="alice") is not None
    assert gov.store(other, answer(other), tenant="acme", user="bob") is not None
    store.delete(embeddings.key("What is the capital of France?", tenant="acme"))  # expired
    gov.mark_bad(bad, tenant="acme", similarity=0.9)
    assert sorted(_vectors_left(store, "acme")) == ["alice", "bob"]
    store.purge(Match(tenant="acme", user="alice"))
    assert _vectors_left(store, "acme") == ["bob"]
    store.close()


# ---- a corrupt cached vector is a miss, not a failed lookup -----------------------------------------------


def test_a_cached_vector_holding_nan_is_a_miss_and_is_rewritten(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cache.db")
    embedder = HashingEmbedder(dim=DIM)
    embeddings = EmbeddingCache(store, embedder)
    cache = SemanticCache(embedder=embeddings, index=FlatIndex(DIM), rule=StaticThreshold(0.9))
    request = chat("What is the capital of France?")
    cache.add(request, tenant="acme", response_key="paris")
    key = embeddings.key("What is the capital of France?", tenant="acme")
    record = store.get(key)
    assert record is not None
    nan = np.full(DIM, np.nan, dtype="<f4")
    store.put(dataclasses.replace(record, value=record.value[:4] + nan.tobytes()))  # right size, bad bytes

    hit = cache.lookup(request, tenant="acme")  # does not raise
    assert hit is not None and hit.response_key == "paris"
    vector, was_hit = embeddings.embed("What is the capital of France?", tenant="acme")
    assert was_hit and np.all(np.isfinite(vector))  # rewritten with the recomputed vector
    store.close()


# ---- hnswlib: a search asking for (nearly) every live entry of a graph with deleted elements ------------


def _paraphrase_cluster(n: int, seed: int = 0) -> np.ndarray:
    """`n` vectors all very close to one another, as the paraphrases of one question are."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(DIM).astype(np.float32)
    v = base + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _graph_with_deletions() -> tuple[HNSWIndex, list[IndexEntry]]:
    """A graph partition of 1,200 paraphrases, half removed one at a time (hnswlib marks them deleted)."""
    vectors = _paraphrase_cluster(1200)
    data = [entry(f"e{i}", v, rkey=f"r{i}") for i, v in enumerate(vectors)]
    index = HNSWIndex(DIM, config=HNSWConfig(min_graph_size=16))
    index.add(data)
    for i in range(0, 1200, 2):
        index.remove([f"e{i}"])
    assert index.graph_partitions() == 1
    return index, [e for i, e in enumerate(data) if i % 2]


def test_a_graph_search_for_every_live_entry_returns_them_all() -> None:
    """hnswlib raised RuntimeError ("Cannot return the results in a contiguous 2D array") when deleted
    elements crowded out the k asked for: not a BackendError, so it escaped every caller."""
    index, live = _graph_with_deletions()
    found = index.search(live[0].vector, tenant="t", context_key="c", k=len(live))
    assert sorted(n.entry_id for n in found) == sorted(e.entry_id for e in live)
    reference = FlatIndex(DIM)
    reference.add(live)
    want = reference.search(live[0].vector, tenant="t", context_key="c", k=len(live))
    assert [n.similarity for n in found] == pytest.approx([n.similarity for n in want], abs=1e-5)
    index.close()


def test_mark_bad_in_a_large_paraphrase_partition_removes_every_neighbour() -> None:
    """`mark_bad` doubles k while the k-th neighbour is above the bar, up to the partition's size: on a
    graph partition with deletions that search crashed the administrative call."""
    index, live = _graph_with_deletions()
    bar = 0.9
    assert min(float(live[0].vector @ e.vector) for e in live) >= bar  # every live entry is a neighbour
    semantic = SemanticCache(embedder=HashingEmbedder(dim=DIM), index=index, rule=StaticThreshold(0.95))
    gov = Governance(ExactCache(MemoryStore()), semantic=semantic)
    report = gov.mark_bad(live[0].response_key, tenant="t", similarity=bar)
    assert sorted(n.entry_id for n in report.entries) == sorted(e.entry_id for e in live)
    assert len(index) == 0
    index.close()


class _FailingModel(HashingEmbedder):
    """A real embedder whose model fails the way torch does (a CUDA out-of-memory is a RuntimeError)."""

    def embed(self, texts: Sequence[str]) -> Vectors:
        raise RuntimeError("CUDA out of memory")


@pytest.mark.parametrize("cached", [False, True], ids=["bare", "embedding-cache"])
def test_a_failing_embedder_is_a_miss_and_a_backend_error_not_a_crash(cached: bool) -> None:
    """The serving path handles BackendError (a miss, a counter); torch's RuntimeError failed requests."""
    model = _FailingModel(dim=DIM)
    embedder = EmbeddingCache(MemoryStore(), model) if cached else model
    cache = SemanticCache(embedder=embedder, index=FlatIndex(DIM), rule=StaticThreshold(0.9))
    assert cache.lookup(chat("what is the capital of France?"), tenant="t") is None
    assert cache.stats.errors == 1
    with pytest.raises(BackendError, match="embedder failed: RuntimeError"):
        cache.add(chat("what is the capital of France?"), tenant="t", response_key="r1")


@pytest.mark.parametrize("kind", ["flat", "pgvector"])
def test_a_single_id_string_is_refused_not_read_as_its_characters(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """`remove("e1")` removed entries "e" and "1"; the ids must come as a list."""
    if kind == "flat":
        index: VectorIndex = FlatIndex(DIM)
    else:
        index = PgVectorIndex(request.getfixturevalue("pg_url"), DIM, table=request.getfixturevalue("table"))
    vectors = unit(2, seed=5)
    index.add([entry("e", vectors[0], rkey="r"), entry("1", vectors[1], rkey="1")])
    with pytest.raises(ConfigError, match="`entry_ids` must be an iterable of str"):
        index.remove("e1")
    with pytest.raises(ConfigError, match="`response_keys` must be an iterable of str"):
        index.remove_response_keys("t", "r1")
    assert len(index) == 2
    index.close()


def test_a_closed_persisted_index_refuses_changes_it_could_not_keep(tmp_path: Path) -> None:
    """An `add` after `close` went to memory only and was lost without a word at the next open."""
    vectors = unit(2, seed=6)
    index = HNSWIndex(DIM, path=tmp_path / "cache.db")
    index.add([entry("kept", vectors[0], rkey="r0")])
    index.close()
    with pytest.raises(BackendError, match="is closed"):
        index.add([entry("lost", vectors[1], rkey="r1")])
    with pytest.raises(BackendError, match="is closed"):
        index.remove(["kept"])
    again = HNSWIndex(DIM, path=tmp_path / "cache.db")
    assert len(again) == 1 and again.get("kept") is not None and again.get("lost") is None
    again.close()
