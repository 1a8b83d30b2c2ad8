"""Governance with the real all-MiniLM-L6-v2 embedder, a real Redis store and real indexes (HNSW, pgvector).

A support-desk cache: one wrong answer about password resets is reported; its paraphrases (by meaning, not
by shared words) go with it, other questions stay; a corrected answer is then served to the paraphrases.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cachelm.governance import Governance
from cachelm.response.exact import ExactCache
from cachelm.semantic import (
    EmbeddingCache,
    HNSWIndex,
    MiniLMEmbedder,
    PgVectorIndex,
    SemanticCache,
    StaticThreshold,
    VectorIndex,
)
from cachelm.store.redis import RedisStore

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

BAD = "How do I reset my password?"
OTHERS = [
    "How can I reset my password?",
    "I forgot my password, how can I change it?",
    "What are the steps to recover a forgotten password?",
    "How do I delete my account?",
    "What is your refund policy?",
    "Best pizza in Naples",
]
BAR = 0.7


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder(device="cpu", batch_size=8)


def ask(text: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": text}]
    return {"model": "gpt-4o-mini", "temperature": 0, "messages": messages}


def reply(text: str, *, version: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": f"[{version}] about: {text}"}
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


@pytest.fixture(params=["hnsw", "pgvector"])
def index(request: pytest.FixtureRequest, minilm: MiniLMEmbedder) -> Iterator[VectorIndex]:
    if request.param == "hnsw":
        ix: VectorIndex = HNSWIndex(minilm.dim)
        yield ix
        ix.close()
        return
    pg_url, table = request.getfixturevalue("pg_url"), request.getfixturevalue("namespace")
    pg = PgVectorIndex(pg_url, minilm.dim, table=table)
    yield pg
    pg.drop()
    pg.close()


def test_a_reported_answer_leaves_with_its_paraphrases_and_a_corrected_one_is_served(
    minilm: MiniLMEmbedder, index: VectorIndex, redis_url: str, namespace: str
) -> None:
    vectors = minilm.embed([BAD, *OTHERS])
    sims = dict(zip(OTHERS, (vectors[1:] @ vectors[0]).tolist(), strict=True))
    gone = {t for t, s in sims.items() if s >= BAR}
    kept = set(OTHERS) - gone
    assert {"How can I reset my password?"} <= gone and {"Best pizza in Naples"} <= kept
    store = RedisStore.from_url(redis_url, namespace=namespace)
    try:
        semantic = SemanticCache(
            embedder=EmbeddingCache(store, minilm), index=index, rule=StaticThreshold(0.8)
        )
        gov = Governance(ExactCache(store), semantic=semantic)
        keys = {}
        for text in [BAD, *OTHERS]:  # written as the proxy does (no request log): vectors come from the index
            key = gov.exact.store(ask(text), reply(text, version="wrong"), tenant="acme")
            assert key is not None
            semantic.add(ask(text), tenant="acme", response_key=key)
            keys[text] = key
        twin = gov.exact.store(ask(BAD), reply(BAD, version="wrong"), tenant="globex")
        assert twin is not None
        semantic.add(ask(BAD), tenant="globex", response_key=twin)

        report = gov.mark_bad(keys[BAD], tenant="acme", similarity=BAR)

        assert report.neighbours_searched
        assert set(report.response_keys) == {keys[BAD]} | {keys[t] for t in gone}
        for text in OTHERS:
            assert (store.peek(keys[text]) is None) == (text in gone), (text, sims[text])
        assert store.peek(twin) is not None  # another tenant's identical entry is untouched
        assert semantic.lookup(ask("How can I reset my password?"), tenant="acme") is None

        fixed = gov.store(ask(BAD), reply(BAD, version="fixed"), tenant="acme")
        assert fixed is not None
        hit = semantic.lookup(ask("How can I reset my password?"), tenant="acme")
        assert hit is not None and hit.response_key == fixed
        served = gov.exact.backend.peek(hit.response_key)
        assert served is not None and b"[fixed]" in served.value
        assert np.isfinite(hit.similarity)
    finally:
        store.clear()
        store.close()
