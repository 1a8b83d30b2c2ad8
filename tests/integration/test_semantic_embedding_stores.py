"""EmbeddingCache on the real record stores (SQLite file, Redis server) opened by URL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cachelm.semantic import EmbeddingCache, HashingEmbedder
from cachelm.store.url import open_store

EMB = HashingEmbedder(dim=64)


def _roundtrip(url: str) -> None:
    texts = ["what is a cache?", "how do vectors work", "what is a cache?"]
    with open_store(url) as store:
        first = EmbeddingCache(store, EMB).embed_many(texts, tenant="acme")
        assert first.hits == (False, False, False)
    with open_store(url) as store:  # a new process would see the same: reopened store, fresh cache object
        again = EmbeddingCache(store, EMB).embed_many(texts, tenant="acme")
        assert again.hits == (True, True, True)
        assert np.array_equal(again.vectors, EMB.embed(texts))  # reuse == recompute, bit for bit
        assert EmbeddingCache(store, EMB).embed("what is a cache?", tenant="other")[1] is False
        assert EmbeddingCache(store, EMB).remove_tenant("acme") == 2


def test_embedding_cache_on_sqlite(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'cache.db'}")


def test_embedding_cache_on_redis(redis_url: str, namespace: str) -> None:
    sep = "&" if "?" in redis_url else "?"
    url = f"{redis_url}{sep}namespace={namespace}"
    try:
        _roundtrip(url)
    finally:
        with open_store(url) as store:
            store.clear()


@pytest.mark.parametrize("url", ["memory://"])
def test_embedding_cache_on_memory_url(url: str) -> None:
    with open_store(url) as store:
        cache = EmbeddingCache(store, EMB)
        assert cache.embed("x")[1] is False and cache.embed("x")[1] is True
