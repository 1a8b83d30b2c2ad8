"""Bad-answer feedback (`Governance.mark_bad`) on real stores (SQLite, Redis) with a deterministic embedder.

Expected neighbour sets are computed from the embedder's own similarities and the threshold; each test
first checks that its data puts entries on both sides of the threshold, so a test cannot pass by removing
everything or nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachelm.errors import ConfigError
from cachelm.governance import Governance, RequestLog
from cachelm.governance.journal import REQUEST_TAG
from cachelm.response.exact import ExactCache
from cachelm.semantic import (
    BoundedErrorConfig,
    BoundedErrorPolicy,
    EmbeddingCache,
    FlatIndex,
    HashingEmbedder,
    HNSWConfig,
    HNSWIndex,
    SemanticCache,
    StaticThreshold,
)
from cachelm.semantic.index import VectorIndex
from cachelm.store import MemoryStore, Store
from cachelm.store.base import Match
from cachelm.store.redis import RedisStore
from cachelm.store.sqlite import SQLiteStore

EMB = HashingEmbedder(dim=128)
BAD = "What is the capital of France?"
SAME_CONTEXT = [
    "what is the capital of france",
    "What's the capital of France?",
    "What is the capital city of France?",
    "Tell me the capital of France please",
    "What is the population of France?",
    "What is the capital of Spain?",
    "How do I bake sourdough bread?",
]
BAR = 0.8


def chat(text: str, *, system: str = "be brief", model: str = "gpt-4o-mini") -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return {"model": model, "temperature": 0, "messages": messages}


def answer(request: dict[str, Any], *, version: str = "v1") -> dict[str, Any]:
    """A deterministic 'model': the answer is derived from the request (and a model version) only."""
    text = request["messages"][-1]["content"]
    words = len(text.split())
    return {
        "object": "chat.completion",
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"{version}: {text}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": words, "completion_tokens": words + 1, "total_tokens": 2 * words + 1},
    }


def put(gov: Governance, request: dict[str, Any], *, tenant: str = "acme", **kw: Any) -> str:
    """Store the deterministic answer to `request` through governance; returns its key."""
    key = gov.store(request, answer(request), tenant=tenant, **kw)
    assert key is not None
    return key


def similarity(a: str, b: str) -> float:
    v = EMB.embed([a, b])
    return float(v[0] @ v[1])


@contextlib.contextmanager
def open_store(kind: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh real store: SQLite in a temporary file, or Redis under a unique namespace."""
    store: Store
    if kind == "sqlite":
        store = SQLiteStore(request.getfixturevalue("tmp_path") / "cache.db")
    else:
        url, ns = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
        store = RedisStore.from_url(url, namespace=ns)
    try:
        yield store
    finally:
        if kind == "redis":
            store.clear()
        store.close()


def make_gov(store: Store, *, index: VectorIndex | None = None, rule: Any = None) -> Governance:
    semantic = SemanticCache(
        embedder=EmbeddingCache(MemoryStore(), EMB),
        index=index if index is not None else FlatIndex(EMB.dim),
        rule=rule if rule is not None else StaticThreshold(0.95),
    )
    return Governance(ExactCache(store), semantic=semantic)


def semantic_ids(gov: Governance, request: dict[str, Any], tenant: str) -> set[str]:
    """Entry ids of the partition `request` falls in (all of them: k large)."""
    assert gov.semantic is not None
    query = gov.semantic.query(request, tenant=tenant)
    assert query is not None
    vector = EMB.embed([query.text])[0]
    found = gov.semantic.index.search(vector, tenant=tenant, context_key=query.context_key, k=1000)
    return {n.entry_id for n in found}


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    with open_store(request.param, request) as s:
        yield s


@pytest.mark.parametrize("by", ["key", "request"])
def test_mark_bad_removes_neighbours_above_the_bar_and_keeps_the_rest(store: Store, by: str) -> None:
    gov = make_gov(store)
    texts = [BAD, *SAME_CONTEXT]
    above = {t for t in texts if similarity(BAD, t) >= BAR}
    below = set(texts) - above
    assert len(above) >= 3 and len(below) >= 3  # the data straddles the bar
    keys = {t: put(gov, chat(t)) for t in texts}
    # The same question in another context of the same tenant, and in the same context of another tenant.
    other_context = put(gov, chat(BAD, system="answer in French"))
    other_tenant = put(gov, chat(BAD), tenant="globex")
    ids_before = semantic_ids(gov, chat(BAD), "acme")
    assert len(ids_before) == len(texts)

    report = gov.mark_bad(keys[BAD] if by == "key" else chat(BAD), tenant="acme", similarity=BAR)

    assert report.response_key == keys[BAD] and report.response_keys[0] == keys[BAD]
    assert set(report.response_keys) == {keys[t] for t in above}
    assert report.neighbours_searched and report.feedback == 1
    assert all(n.similarity >= BAR for n in report.entries)
    assert {n.response_key for n in report.entries} == {keys[t] for t in above}
    for text in above:
        assert store.peek(keys[text]) is None, text
        assert RequestLog(store).get(keys[text], tenant="acme") is None
    for text in below:
        assert gov.exact.lookup(chat(text), tenant="acme") is not None, text
        assert RequestLog(store).get(keys[text], tenant="acme") is not None
    assert len(semantic_ids(gov, chat(BAD), "acme")) == len(below)
    assert {n.entry_id for n in report.entries} == ids_before - semantic_ids(gov, chat(BAD), "acme")
    # Other contexts and other tenants are untouched, answers and semantic entries alike.
    assert store.peek(other_context) is not None and store.peek(other_tenant) is not None
    assert len(semantic_ids(gov, chat(BAD, system="answer in French"), "acme")) == 1
    assert len(semantic_ids(gov, chat(BAD), "globex")) == 1
    assert gov.semantic is not None and gov.semantic.lookup(chat(BAD), tenant="globex") is not None


def test_a_key_of_another_tenant_is_unknown_and_untouched(store: Store) -> None:
    gov = make_gov(store)
    theirs = gov.store(chat(BAD), answer(chat(BAD)), tenant="globex")
    ours = gov.store(chat(SAME_CONTEXT[0]), answer(chat(SAME_CONTEXT[0])), tenant="acme")
    assert theirs and ours
    report = gov.mark_bad(theirs, tenant="acme", similarity=0.0)
    assert report.response_keys == () and report.entries == () and not report.neighbours_searched
    assert store.peek(theirs) is not None and store.peek(ours) is not None
    assert RequestLog(store).get(theirs, tenant="globex") is not None
    assert len(semantic_ids(gov, chat(BAD), "globex")) == 1


def test_the_bad_answer_is_a_wrong_sample_of_the_bounded_rule_when_it_was_being_verified(
    store: Store,
) -> None:
    rule = BoundedErrorPolicy(BoundedErrorConfig(delta=0.05, seed=1))
    gov = make_gov(store, rule=rule)
    key = gov.store(chat(BAD), answer(chat(BAD)), tenant="acme")
    assert key is not None and gov.semantic is not None
    # Uncertified: every lookup above the floor is a verification candidate, sampled.
    found = gov.semantic.search(chat(SAME_CONTEXT[0]), tenant="acme")
    assert found.hit is None and found.verify is not None and found.verify.decision.sampled
    samples_before = rule.stats.samples

    gov.mark_bad(key, tenant="acme", similarity=0.99)

    assert rule.stats.samples == samples_before + 1  # the outcome entered the certificate's sample...
    assert gov.semantic.stats.feedback == 1
    region = rule._regions["acme"]
    last_similarity, wrong = region.samples[-1]
    assert wrong and last_similarity == pytest.approx(found.verify.similarity)  # ...as a wrong answer


def test_a_fresh_answer_to_the_same_question_is_not_vetoed_after_removal(store: Store) -> None:
    rule = BoundedErrorPolicy(BoundedErrorConfig(delta=0.05, seed=1))
    gov = make_gov(store, rule=rule)
    key = gov.store(chat(BAD), answer(chat(BAD)), tenant="acme")
    assert key is not None and gov.semantic is not None
    report = gov.mark_bad(key, tenant="acme")  # no pending verification: a complaint (veto) ...
    (entry,) = report.entries
    # ... which is forgotten once the entry is gone: the entry id names the question, not the answer.
    assert entry.entry_id not in rule._entry_boundary
    gov.store(chat(BAD), answer(chat(BAD), version="fixed"), tenant="acme")
    assert semantic_ids(gov, chat(BAD), "acme") == {entry.entry_id}


@pytest.mark.parametrize("index_kind", ["flat", "hnsw-graph"])
def test_by_key_without_a_logged_request_reads_the_vector_back_from_the_index(
    store: Store, index_kind: str
) -> None:
    index: VectorIndex = (
        FlatIndex(EMB.dim)
        if index_kind == "flat"
        else HNSWIndex(EMB.dim, config=HNSWConfig(min_graph_size=4))
    )
    gov = make_gov(store, index=index)
    assert gov.semantic is not None
    texts = [BAD, *SAME_CONTEXT]
    keys = {}
    for text in texts:  # written as the proxy does: answer and semantic entry, no request log
        key = gov.exact.store(chat(text), answer(chat(text)), tenant="acme")
        assert key is not None
        gov.semantic.add(chat(text), tenant="acme", response_key=key)
        keys[text] = key
    if index_kind == "hnsw-graph":
        assert isinstance(index, HNSWIndex) and index.graph_partitions() == 1
    above = {t for t in texts if similarity(BAD, t) >= BAR}
    assert 3 <= len(above) < len(texts)

    report = gov.mark_bad(keys[BAD], tenant="acme", similarity=BAR)

    assert report.neighbours_searched
    assert set(report.response_keys) == {keys[t] for t in above}
    for text in texts:
        assert (store.peek(keys[text]) is None) == (text in above), text


def test_without_a_semantic_layer_only_the_answer_and_its_request_go(store: Store) -> None:
    gov = Governance(ExactCache(store))
    key = gov.store(chat(BAD), answer(chat(BAD)), tenant="acme")
    kept = gov.store(chat(SAME_CONTEXT[0]), answer(chat(SAME_CONTEXT[0])), tenant="acme")
    assert key and kept
    assert {r.key for r in store.scan(Match(tag=REQUEST_TAG))} == {f"request:{key}", f"request:{kept}"}
    report = gov.mark_bad(chat(BAD), tenant="acme")
    assert report.response_keys == (key,) and report.entries == () and not report.neighbours_searched
    assert store.peek(key) is None and store.peek(f"request:{key}") is None
    assert store.peek(kept) is not None


def test_request_log_mirrors_the_answer_metadata_and_goes_with_erasure(store: Store) -> None:
    gov = Governance(ExactCache(store))
    key = gov.store(chat(BAD), answer(chat(BAD)), tenant="acme", user="ann", tags=["faq"], ttl=3600)
    assert key is not None
    logged = gov.log.get(key, tenant="acme")
    assert logged is not None and logged.request == chat(BAD) and logged.endpoint == "chat.completions"
    stored = store.peek(key)
    assert stored is not None
    assert (logged.user, set(logged.tags), logged.model) == ("ann", {"faq"}, "gpt-4o-mini")
    assert logged.expires == stored.expires is not None
    assert gov.log.get(key, tenant="globex") is None
    assert gov.exact.erase_user("acme", "ann") == 2  # the answer and its question
    assert len(store) == 0


def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "c.db") as store:
        gov = make_gov(store)
        for bad, name in [(1.5, "similarity"), (True, "similarity"), (float("nan"), "similarity")]:
            with pytest.raises(ConfigError, match=f"`{name}`"):
                gov.mark_bad("k", tenant="acme", similarity=bad)
        with pytest.raises(ConfigError, match="`tenant`"):
            gov.mark_bad("k", tenant="")
        with pytest.raises(ConfigError, match="`target`"):
            gov.mark_bad("", tenant="acme")
        with pytest.raises(ConfigError, match="`target`"):
            gov.mark_bad(3, tenant="acme")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="`exact`"):
            Governance(store)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="`endpoint`"):
            gov.remember(chat(BAD), "k", endpoint="images")
        # An unknown key removes nothing and says so.
        report = gov.mark_bad("0" * 64, tenant="acme")
        assert report.response_keys == () and report.entries == ()


def test_the_index_search_is_exhaustive_above_the_bar_beyond_one_batch(tmp_path: Path) -> None:
    """More neighbours above the bar than the first search batch: all are found (k doubles)."""
    with SQLiteStore(tmp_path / "c.db") as store:
        gov = make_gov(store)
        texts = [f"What is the capital of France? ({i})" for i in range(80)]
        keys = [gov.store(chat(t), answer(chat(t)), tenant="acme") for t in texts]
        far = gov.store(chat("How do I bake sourdough bread?"), answer(chat("bread")), tenant="acme")
        sims = np.array([similarity(texts[0], t) for t in texts])
        assert sims.min() >= 0.7 and similarity(texts[0], "How do I bake sourdough bread?") < 0.7
        report = gov.mark_bad(keys[0] or "", tenant="acme", similarity=0.7)
        assert set(report.response_keys) == set(keys) and store.peek(far or "") is not None


def test_public_names_are_sorted_and_importable() -> None:
    import cachelm.governance as governance

    assert list(governance.__all__) == sorted(governance.__all__)
    assert all(hasattr(governance, name) for name in governance.__all__)
