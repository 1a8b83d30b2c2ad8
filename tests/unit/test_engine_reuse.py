"""Reuse equals recompute: the engine with a KV prefix cache gives the same greedy tokens as without, and
first-token logits within a stated tolerance, for every hit shape, tier, lossless codec and a sliding-window
model. Tiny random-weight models on CPU (float32): reuse changes only the matmul shapes of the prefill, so
logits agree to float32 rounding; the tolerance is ``atol = 1e-4`` on logits of magnitude ~1–10.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cachelm.crypto import Keyring
from cachelm.engine.engine import Engine, GenerationResult, SamplingParams, build_prefix_cache
from cachelm.engine.tiny import tiny_gemma3, tiny_llama, tiny_tokenizer
from cachelm.errors import ConfigError
from cachelm.kv.codecs import Int8Codec
from cachelm.kv.prefix_cache import KVPrefixCache
from cachelm.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4
GREEDY = SamplingParams(max_new_tokens=12)
TEXT = "The quick brown fox jumps over the lazy dog. There is a theory that the theatre is there. "


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_llama(initializer_range=0.1)


@pytest.fixture(scope="module")
def gemma() -> Any:
    return tiny_gemma3(sliding_window=16, initializer_range=0.1)


def _engine(model: Any, tokenizer: Any, *tiers: Tier, block_size: int = 16) -> Engine:
    pc = KVPrefixCache(
        layout=build_prefix_cache(model, model_id="tiny", cpu_bytes=1).layout,
        model=build_prefix_cache(model, model_id="tiny", cpu_bytes=1).model,
        tiers=list(tiers) or [MemoryTier(capacity_bytes=1 << 24)],
        block_size=block_size,
    )
    return Engine(model, tokenizer, prefix_cache=pc)


def _same(reused: GenerationResult, fresh: GenerationResult) -> None:
    assert reused.token_ids == fresh.token_ids
    assert reused.first_logits is not None and fresh.first_logits is not None
    torch.testing.assert_close(reused.first_logits, fresh.first_logits, atol=ATOL, rtol=0)


def test_full_prompt_hit_is_capped_and_equal(llama: Any, tokenizer: Any) -> None:
    engine, base = _engine(llama, tokenizer), Engine(llama, tokenizer)
    ids = tokenizer(TEXT * 3).input_ids[:65]  # 64 + 1: four full blocks and one more token
    first = engine.generate(ids, GREEDY)
    assert first.num_cached_tokens == 0
    again = engine.generate(ids, GREEDY)
    assert again.num_cached_tokens == 64  # the whole prompt but its last token
    _same(again, base.generate(ids, GREEDY))
    exact = ids[:64]  # a prompt that is exactly 4 blocks: the hit is capped at 3 blocks
    assert engine.generate(exact, GREEDY).num_cached_tokens == 48


def test_partial_block_hit(llama: Any, tokenizer: Any) -> None:
    engine, base = _engine(llama, tokenizer), Engine(llama, tokenizer)
    ids = tokenizer(TEXT * 3).input_ids
    engine.generate(ids[:40], GREEDY)  # stores blocks 0, 1 (32 tokens) + generated tokens' blocks
    longer = ids[:40] + tokenizer(" Hello, how are you today?").input_ids
    reused = engine.generate(longer, GREEDY)
    assert 32 <= reused.num_cached_tokens < len(longer)
    _same(reused, base.generate(longer, GREEDY))


def test_tokenisation_boundary(llama: Any, tokenizer: Any) -> None:
    # "cach" then "cache": appending text re-tokenises the end of the old prompt, so the cache must reuse
    # only the blocks whose token ids still match, never the text.
    engine, base = _engine(llama, tokenizer, block_size=4), Engine(llama, tokenizer)
    short, long = TEXT + "A cach", TEXT + "A cache keeps"
    ids_short, ids_long = tokenizer(short).input_ids, tokenizer(long).input_ids
    common = next(i for i, (a, b) in enumerate(zip(ids_short, ids_long, strict=False)) if a != b)
    assert common < len(ids_short)  # the boundary really re-tokenises
    engine.generate(short, GREEDY)
    reused = engine.generate(long, GREEDY)
    assert reused.num_cached_tokens == (common // 4) * 4
    _same(reused, base.generate(long, GREEDY))


@pytest.fixture(
    params=["cpu", "disk", "disk-sealed", "redis", "redis-sealed", pytest.param("gpu", marks=pytest.mark.gpu)]
)
def lower_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tier]:
    tier: Tier
    keyring = Keyring.generate() if request.param.endswith("-sealed") else None
    if request.param == "cpu":
        tier = MemoryTier(capacity_bytes=1 << 24)
    elif request.param == "gpu":
        tier = MemoryTier(capacity_bytes=1 << 24, device="cuda")
    elif request.param.startswith("disk"):
        tier = DiskTier(tmp_path, capacity_bytes=1 << 24, keyring=keyring)
    else:
        ns = request.getfixturevalue("namespace")
        url = request.getfixturevalue("redis_url")
        tier = RedisTier(url, namespace=ns, capacity_bytes=1 << 24, keyring=keyring)
    yield tier
    tier.clear()


def test_every_tier_serves_an_equal_hit(llama: Any, tokenizer: Any, lower_tier: Tier) -> None:
    # A one-block top tier pushes everything else down to `lower_tier` (write-behind demotion).
    top = MemoryTier(capacity_bytes=16 * 2 * 4 * 2 * 16 * 4)  # one 16-token block of the tiny Llama
    engine, base = _engine(llama, tokenizer, top, lower_tier), Engine(llama, tokenizer)
    ids = tokenizer(TEXT * 3).input_ids[:70]
    engine.generate(ids, GREEDY)
    assert engine.prefix_cache is not None
    engine.prefix_cache.flush()
    assert len(lower_tier) >= 3
    reused = engine.generate(ids, GREEDY)
    assert reused.num_cached_tokens == 64
    assert engine.prefix_cache.stats.tier_hits.get(lower_tier.name, 0) >= 3
    _same(reused, base.generate(ids, GREEDY))


@pytest.mark.parametrize(
    ("dtype", "codec"),
    [
        (torch.float32, "raw"),
        (torch.bfloat16, "raw"),
        (torch.bfloat16, "bfloat16"),
        (torch.float16, "float16"),
    ],
)
def test_every_lossless_codec(tokenizer: Any, dtype: torch.dtype, codec: str) -> None:
    model = tiny_llama(initializer_range=0.1).to(dtype)
    pc = build_prefix_cache(model, model_id="tiny", block_size=16, codec=codec, cpu_bytes=1 << 24)
    engine, base = Engine(model, tokenizer, prefix_cache=pc), Engine(model, tokenizer)
    ids = tokenizer(TEXT * 2).input_ids[:50]
    engine.generate(ids, GREEDY)
    reused, fresh = engine.generate(ids, GREEDY), base.generate(ids, GREEDY)
    assert reused.num_cached_tokens == 48
    assert reused.token_ids == fresh.token_ids
    assert reused.first_logits is not None and fresh.first_logits is not None
    # Half precision rounds differently with different prefill shapes: tolerance of its epsilon scale.
    tol = ATOL if dtype == torch.float32 else 0.1
    torch.testing.assert_close(reused.first_logits, fresh.first_logits, atol=tol, rtol=0)


def test_int8_codec_is_close(llama: Any, tokenizer: Any) -> None:
    engine = _engine(llama, tokenizer, MemoryTier(capacity_bytes=1 << 24, codec=Int8Codec()))
    ids = tokenizer(TEXT * 2).input_ids[:50]
    fresh = engine.generate(ids, GREEDY)
    reused = engine.generate(ids, GREEDY)
    assert (
        reused.num_cached_tokens == 48 and reused.first_logits is not None and fresh.first_logits is not None
    )
    err = (reused.first_logits - fresh.first_logits).abs().max().item()
    assert 0 < err < 0.05 * fresh.first_logits.abs().max().item()  # lossy, but by little


@pytest.mark.parametrize("prefix_blocks", [0, 1, 2, 5])  # 0, 8, 16 (= W) and 40 (> W) tokens, W = 16
def test_sliding_window_model(gemma: Any, tokenizer: Any, prefix_blocks: int) -> None:
    engine, base = _engine(gemma, tokenizer, block_size=8), Engine(gemma, tokenizer)
    ids = tokenizer(TEXT * 3).input_ids
    if prefix_blocks:
        engine.generate(ids[: prefix_blocks * 8 + 1], SamplingParams(max_new_tokens=1))
    prompt = ids[:60]
    reused, fresh = engine.generate(prompt, GREEDY), base.generate(prompt, GREEDY)
    assert reused.num_cached_tokens == prefix_blocks * 8
    _same(reused, fresh)
    # And once more, from the blocks this very request stored (prompt + generated tokens).
    follow = prompt + reused.token_ids + tokenizer(" Paris.").input_ids
    _same(engine.generate(follow, GREEDY), base.generate(follow, GREEDY))


def test_sampling_with_seed_is_reproducible_and_reuse_invariant(llama: Any, tokenizer: Any) -> None:
    engine, base = _engine(llama, tokenizer), Engine(llama, tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    ids = tokenizer(TEXT * 2).input_ids[:50]
    runs = [engine.generate(ids, params).token_ids for _ in range(2)] + [base.generate(ids, params).token_ids]
    assert runs[0] == runs[1] == runs[2]
    other = base.generate(ids, SamplingParams(max_new_tokens=10, temperature=0.9, seed=8)).token_ids
    assert other != runs[0]


def test_streaming_and_callback(llama: Any, tokenizer: Any) -> None:
    engine = Engine(llama, tokenizer)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    events = list(engine.stream(messages, GREEDY))
    seen: list[int] = []
    result = engine.generate(messages, GREEDY, on_token=lambda e: seen.append(e.token_id))
    assert [e.token_id for e in events] == seen == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert [e.index for e in events] == list(range(len(events)))


def test_chat_template_is_applied(llama: Any, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = Engine(llama, tokenizer).encode(messages)
    text = tokenizer.decode(ids)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"


def test_stops_on_stop_token(llama: Any, tokenizer: Any) -> None:
    engine = Engine(llama, tokenizer)
    ids = tokenizer(TEXT).input_ids
    free = engine.generate(ids, SamplingParams(max_new_tokens=6))
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    stop = free.token_ids[2]
    first_stop = free.token_ids.index(stop)
    stopped = engine.generate(ids, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)))
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first_stop + 1]


def test_bad_arguments(llama: Any, tokenizer: Any) -> None:
    engine = Engine(llama, tokenizer)
    with pytest.raises(ConfigError, match="`max_new_tokens`"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ConfigError, match="`top_p`"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="`prompt`"):
        engine.encode([])
    with pytest.raises(ConfigError, match="`prompt` token ids"):
        engine.encode([1, 10**9])
    with pytest.raises(ConfigError, match="`model_id`"):
        build_prefix_cache(tiny_llama(), cpu_bytes=1)
    gemma_cache = build_prefix_cache(tiny_gemma3(), model_id="g", cpu_bytes=1)
    with pytest.raises(ConfigError, match="`prefix_cache` layout"):
        Engine(llama, tokenizer, prefix_cache=gemma_cache)
