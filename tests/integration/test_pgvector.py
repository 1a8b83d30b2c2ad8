"""PgVectorIndex against a real PostgreSQL + pgvector: the same VectorIndex contract, plus server failures."""

from __future__ import annotations

import numpy as np
import pytest

from cachelm.errors import BackendError, ConfigError
from cachelm.semantic import HashingEmbedder, PgVectorIndex, SemanticCache, StaticThreshold, VectorIndex
from tests.unit.test_semantic_index import DIM, IndexContract, entry, unit


class TestPgVectorContract(IndexContract):
    @pytest.fixture(autouse=True)
    def _server(self, pg_url: str, table: str) -> None:
        self.url, self.table = pg_url, table

    def make(self, dim: int = DIM) -> VectorIndex:
        return PgVectorIndex(self.url, dim, table=self.table)


def test_large_partition_uses_the_hnsw_index_and_keeps_the_filter(pg_url: str, table: str) -> None:
    ix = PgVectorIndex(pg_url, DIM, table=table)
    try:
        vecs = unit(np.random.default_rng(0), 2000)
        ix.add([entry(i, v, tenant="a" if i % 2 else "b") for i, v in enumerate(vecs)])
        with ix._lock:
            ix._conn.execute("ANALYZE " + table)
            plan = "\n".join(
                r[0]
                for r in ix._conn.execute(
                    f"EXPLAIN SELECT entry_id FROM {table} WHERE tenant = 'a' AND context_key = 'c1'"
                    f" ORDER BY embedding <#> %s LIMIT 1",
                    (vecs[0],),
                ).fetchall()
            )
        assert f"{table}_hnsw" in plan  # the ANN index serves the filtered search
        for q in unit(np.random.default_rng(1), 20):
            found = ix.search(q, tenant="a", context_key="c1", k=5)
            assert len(found) == 5
            assert all(int(n.entry_id[1:]) % 2 == 1 for n in found)  # only tenant a's rows
    finally:
        ix.close()


def test_reopen_with_other_dim_is_rejected(pg_url: str, table: str) -> None:
    ix = PgVectorIndex(pg_url, DIM, table=table)
    try:
        with pytest.raises(ConfigError, match="`dim`"):
            PgVectorIndex(pg_url, DIM + 1, table=table)
    finally:
        ix.close()


def test_bad_table_name_is_rejected(pg_url: str) -> None:
    with pytest.raises(ConfigError, match="`table`"):
        PgVectorIndex(pg_url, DIM, table="x; DROP TABLE y")


def test_unreachable_server_is_a_backend_error() -> None:
    with pytest.raises(BackendError):
        PgVectorIndex("postgresql://nobody@127.0.0.1:1/none", DIM, connect_timeout=1)


def test_lost_connection_turns_lookups_into_misses(pg_url: str, table: str) -> None:
    embedder = HashingEmbedder(dim=DIM)
    ix = PgVectorIndex(pg_url, DIM, table=table)
    cache = SemanticCache(embedder=embedder, index=ix, rule=StaticThreshold(0.9))
    request = {"model": "m", "messages": [{"role": "user", "content": "what is the capital of France?"}]}
    cache.add(request, tenant="t", response_key="answer-1")
    hit = cache.lookup(request, tenant="t")
    assert hit is not None and hit.response_key == "answer-1"
    with ix._lock:
        ix._conn.close()  # the server connection is gone, as after a failover
    assert cache.lookup(request, tenant="t") is None
    assert cache.stats.errors == 1
    with pytest.raises(BackendError):
        cache.add(request, tenant="t", response_key="answer-2")
