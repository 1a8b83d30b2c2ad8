"""SemanticCache facade and EmbeddingCache, with the deterministic hashing embedder and real stores."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cachelm.clock import ManualClock
from cachelm.errors import ConfigError
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
    embedding_key,
)
from cachelm.store import Match, MemoryStore, Record

EMB = HashingEmbedder(dim=128)


def chat(text: str, *, system: str = "be brief", history: tuple[str, ...] = (), model: str = "m") -> dict:
    messages = [{"role": "system", "content": system}]
    for i, turn in enumerate(history):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
    messages.append({"role": "user", "content": text})
    return {"model": model, "messages": messages, "temperature": 0}


def make_cache(rule: object = None, index: object = None) -> SemanticCache:
    return SemanticCache(
        embedder=EmbeddingCache(MemoryStore(), EMB),
        index=index if index is not None else FlatIndex(EMB.dim),  # type: ignore[arg-type]
        rule=rule if rule is not None else StaticThreshold(0.8),  # type: ignore[arg-type]
    )


# -- embedder ---------------------------------------------------------------------------------------
def test_hashing_embedder_contract() -> None:
    v = EMB.embed(["What is the capital of France?", "what is the capital of france", "Bake bread at home"])
    assert v.shape == (3, 128) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert float(v[0] @ v[1]) > 0.9 > float(v[0] @ v[2])
    again = HashingEmbedder(dim=128).embed(
        ["What is the capital of France?", "what is the capital of france"]
    )
    assert np.array_equal(v[:2], again)  # deterministic across instances (and processes: no salted hash)
    with pytest.raises(ConfigError, match="`texts`"):
        EMB.embed("a single string")
    with pytest.raises(ConfigError, match=r"`texts\[1\]`"):
        EMB.embed(["ok", 3])  # type: ignore[list-item]


# -- embedding cache ----------------------------------------------------------------------------------
def test_a_text_with_a_lone_surrogate_is_a_config_error_and_stores_nothing() -> None:
    # Before, UnicodeEncodeError from the key's hash or the n-gram hashing: no error naming the input.
    store = MemoryStore()
    cache = EmbeddingCache(store, EMB)
    with pytest.raises(ConfigError, match=r"`texts\[1\]` must be valid Unicode"):
        EMB.embed(["fine", "bad \ud800"])
    with pytest.raises(ConfigError, match="valid Unicode"):
        cache.embed_many(["fine", "bad \udfff"], tenant="t")
    with pytest.raises(ConfigError, match="`tenant` must be valid Unicode"):
        cache.embed("fine", tenant="t\ud800")
    assert len(store) == 0


def test_embedding_cache_keeps_tags_given_as_a_generator_and_checks_refresh() -> None:
    # Before, the check consumed a generator and the vectors were stored without the caller's tags
    # (a purge by tag then missed them); refresh="no" was truthy.
    store = MemoryStore()
    cache = EmbeddingCache(store, EMB)
    cache.embed_many(["a", "b"], tenant="t", tags=(tag for tag in ["project-x"]))
    assert len(list(store.scan(Match(tag="project-x")))) == 2
    with pytest.raises(ConfigError, match="`refresh`"):
        cache.embed_many(["a"], tenant="t", refresh="no")  # type: ignore[arg-type]


def test_embedding_cache_does_not_store_a_non_finite_vector() -> None:
    # Before, a NaN vector (a model overflowing in float16) was stored, read back as a miss and stored
    # again on every call: a write per call and a counter that never moved.
    class Overflowing(HashingEmbedder):
        def embed(self, texts: Any) -> Any:
            vectors = super().embed(texts)
            vectors[0, 0] = np.nan
            return vectors

    store = MemoryStore()
    cache = EmbeddingCache(store, Overflowing(dim=128))
    vector, hit = cache.embed("overflow", tenant="t")
    assert not hit and np.isnan(vector[0])  # returned as the model gave it: the caller decides
    assert len(store) == 0 and cache.stats.errors == 1


def test_embedding_cache_batch_order_hits_and_recompute_equality() -> None:
    store = MemoryStore()
    cache = EmbeddingCache(store, EMB)
    first = cache.embed_many(["a b c", "d e f", "a b c"])
    assert first.hits == (False, False, False)
    assert len(store) == 2  # duplicates embedded and stored once
    second = cache.embed_many(["d e f", "new text", "a b c"])
    assert second.hits == (True, False, True)
    fresh = EMB.embed(["d e f", "new text", "a b c"])
    assert np.array_equal(second.vectors, fresh)  # reuse == recompute, bit for bit
    assert cache.stats.hits == 2 and cache.stats.misses == 4
    # another EmbeddingCache over the same store sees the vectors
    assert EmbeddingCache(store, EMB).embed("a b c")[1] is True


def test_embedding_cache_is_per_tenant_and_per_model_and_hides_text() -> None:
    store = MemoryStore()
    cache = EmbeddingCache(store, EMB)
    cache.embed("secret question", tenant="alice")
    assert cache.embed("secret question", tenant="bob")[1] is False
    other_model = EmbeddingCache(store, HashingEmbedder(dim=64))
    assert other_model.embed("secret question", tenant="alice")[1] is False
    assert all("secret" not in r.key for r in store.scan())
    assert embedding_key("x", model_id="m", tenant="a") != embedding_key("x", model_id="m", tenant="b")
    assert cache.remove_tenant("alice") == 1


def test_embedding_cache_attributes_vectors_to_the_user_who_cached_them() -> None:
    store = MemoryStore()
    cache = EmbeddingCache(store, EMB)
    cache.embed_many(["mine", "ours"], tenant="t", user="alice")
    assert cache.embed_many(["ours", "bob's"], tenant="t", user="bob").hits == (True, False)
    assert {r.user for r in store.scan()} == {"alice", "bob"}
    assert store.purge(Match(tenant="t", user="alice")) == 2  # erasure by user reaches her vectors
    assert cache.embed_many(["ours", "bob's"], tenant="t").hits == (False, True)
    with pytest.raises(ConfigError, match="`user`"):
        cache.embed_many(["x"], user=None)  # type: ignore[arg-type]


def test_embedding_cache_corrupt_value_is_a_miss_and_is_rewritten() -> None:
    store = MemoryStore()
    cache = EmbeddingCache(store, EMB)
    key = cache.key("hello")
    store.put(Record(key=key, value=b"\x01\x00\x00\x00garbage"))
    vector, hit = cache.embed("hello")
    assert hit is False
    assert np.array_equal(vector, EMB.embed(["hello"])[0])
    assert cache.embed("hello")[1] is True


def test_embedding_cache_ttl() -> None:
    clock = ManualClock(1000.0)
    cache = EmbeddingCache(MemoryStore(clock=clock), EMB, ttl=10)
    cache.embed("x")
    clock.advance(9)
    assert cache.embed("x")[1] is True
    clock.advance(2)
    assert cache.embed("x")[1] is False
    with pytest.raises(ConfigError, match="`ttl`"):
        EmbeddingCache(MemoryStore(), EMB, ttl=0)


# -- semantic cache -----------------------------------------------------------------------------------
def test_paraphrase_hits_and_returns_the_response_key() -> None:
    cache = make_cache()
    entry_id = cache.add(chat("What is the capital of France?"), tenant="t", response_key="resp-1")
    hit = cache.lookup(chat("what is the capital of france"), tenant="t")
    assert hit is not None
    assert hit.response_key == "resp-1" and hit.entry_id == entry_id
    assert hit.similarity > 0.8 and hit.decision.rule == "static"
    assert cache.lookup(chat("How do I bake sourdough bread?"), tenant="t") is None


def test_context_must_match_exactly() -> None:
    cache = make_cache()
    cache.add(chat("and in winter?", history=("weather in Oslo?", "cold")), tenant="t", response_key="oslo")
    assert cache.lookup(chat("and in winter?", history=("weather in Oslo?", "cold")), tenant="t") is not None
    # the same follow-up in another conversation, system prompt, model or parameters never hits
    assert cache.lookup(chat("and in winter?", history=("weather in Rome?", "mild")), tenant="t") is None
    assert (
        cache.lookup(chat("and in winter?", history=("weather in Oslo?", "cold"), system="x"), tenant="t")
        is None
    )
    assert (
        cache.lookup(chat("and in winter?", history=("weather in Oslo?", "cold"), model="m2"), tenant="t")
        is None
    )
    hot = dict(chat("and in winter?", history=("weather in Oslo?", "cold")), temperature=0.7)
    assert cache.lookup(hot, tenant="t") is None


@pytest.mark.parametrize(
    "make_index",
    [lambda: FlatIndex(EMB.dim), lambda: HNSWIndex(EMB.dim, config=HNSWConfig(min_graph_size=4))],
)
def test_tenants_never_see_each_other(make_index: object) -> None:
    cache = make_cache(index=make_index())  # type: ignore[operator]
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    questions = [" ".join(rng.choice(words, 4)) + "?" for _ in range(40)]
    for i, q in enumerate(questions):
        cache.add(chat(q), tenant="a" if i % 2 else "b", response_key=f"{'a' if i % 2 else 'b'}-{i}")
    for q in questions:
        for tenant in ("a", "b", "c"):
            hit = cache.lookup(chat(q), tenant=tenant)
            assert hit is None or hit.response_key.startswith(f"{tenant}-")


def test_verification_protocol_and_feedback() -> None:
    policy = BoundedErrorPolicy(BoundedErrorConfig(delta=0.05, seed=0))
    cache = make_cache(rule=policy)
    eid = cache.add(chat("What is the capital of France?"), tenant="t", response_key="r")
    assert eid is not None
    found = cache.search(chat("what is the capital of france"), tenant="t")
    assert found.hit is None  # nothing certified yet: warm-up
    assert found.verify is not None and found.verify.entry_id == eid and found.decision is not None
    assert found.decision.reason == "warmup" and found.decision.sampled
    assert cache.feedback(eid, True) is True
    assert policy.stats.samples == 1
    assert cache.feedback(eid, True) is False  # nothing pending any more
    with pytest.raises(ConfigError, match="`correct`"):
        cache.feedback(eid, 1)  # type: ignore[arg-type]


def test_complaint_vetoes_an_entry() -> None:
    policy = BoundedErrorPolicy(BoundedErrorConfig(delta=0.05, explore_rate=1e-9, seed=0))
    for _ in range(400):  # 400 lookups without a candidate: P(s >= t) is certified small, hence FHR too
        policy.decide(None, entry_id=None, region="t")
    assert policy.threshold("t") == pytest.approx(0.5)
    cache = make_cache(rule=policy)
    eid = cache.add(chat("What is the capital of France?"), tenant="t", response_key="r")
    assert cache.lookup(chat("What is the capital of France?"), tenant="t") is not None
    assert cache.feedback(eid, False) is False  # not a pending verification: a complaint
    assert cache.lookup(chat("What is the capital of France?"), tenant="t") is None


def test_remove_tenant_and_keys() -> None:
    cache = make_cache()
    cache.add(chat("q one"), tenant="a", response_key="k1")
    cache.add(chat("q two"), tenant="a", response_key="k2")
    cache.add(chat("q one"), tenant="b", response_key="k1")
    assert cache.remove_keys("a", "k1") == 1
    assert cache.lookup(chat("q one"), tenant="a") is None
    assert cache.lookup(chat("q one"), tenant="b") is not None
    assert cache.remove_tenant("a") == 1
    assert cache.lookup(chat("q two"), tenant="a") is None


def test_requests_without_a_user_turn_are_misses_and_bad_args_raise() -> None:
    cache = make_cache()
    no_user = {"model": "m", "messages": [{"role": "assistant", "content": "hi"}]}
    assert cache.add(no_user, tenant="t", response_key="r") is None
    assert cache.lookup(no_user, tenant="t") is None
    with pytest.raises(ConfigError, match="`tenant_id`"):
        cache.lookup(chat("x"), tenant="")
    with pytest.raises(ConfigError, match="`response_key`"):
        cache.add(chat("x"), tenant="t", response_key="")
    with pytest.raises(ConfigError, match="`index`"):
        SemanticCache(embedder=EMB, index=FlatIndex(7))


def test_public_names_are_sorted_and_exported() -> None:
    import cachelm.semantic as semantic

    assert semantic.__all__ == sorted(semantic.__all__)
    assert all(hasattr(semantic, name) for name in semantic.__all__)
