"""The lean static-buffer suffix prefill equals HF's forward (CPU, tiny random Llama and Gemma-3, float32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cachelm.engine.engine import build_prefix_cache
from cachelm.engine.static_runner import StaticRunner
from cachelm.engine.tiny import tiny_gemma3, tiny_llama
from cachelm.errors import ConfigError
from cachelm.kv import hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_llama(initializer_range=0.1)


def _hf_prefill(model: Any, ids: list[int]) -> tuple[torch.Tensor, Any]:
    cache = hf.new_cache(model)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache).logits[0, -1].float()
    return logits, cache


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"attention": "split", "split_chunk": 8},
        {"attention": "split", "split_chunk": 5},
        {"fuse_weights": True},
        {"fuse_weights": True, "attention": "split", "split_chunk": 8},
    ],
)
def test_suffix_on_loaded_prefix_matches_hf(options: dict[str, Any]) -> None:
    ids = torch.randint(3, 384, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    llama = tiny_llama(initializer_range=0.1)  # its own copy: fuse_weights repacks the module weights
    want, full_cache = _hf_prefill(llama, ids)
    runner = StaticRunner(llama, max_tokens=64, **options)
    runner.kv[:32] = hf.extract(full_cache, 48)[:32]
    got = runner(ids[32:], 32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The suffix's KV written into the buffer equals HF's.
    torch.testing.assert_close(runner.kv[32:48], hf.extract(full_cache, 48)[32:], atol=1e-5, rtol=0)
    # A whole prompt from position 0 works too.
    whole = StaticRunner(llama, max_tokens=64, **options)(ids, 0)
    torch.testing.assert_close(whole, want, atol=1e-4, rtol=0)
    # The model itself is unchanged by packing (its weights became views of the packed tensors).
    again, _ = _hf_prefill(llama, ids)
    torch.testing.assert_close(again, want, atol=0, rtol=0)


def test_prefix_cache_loads_straight_into_the_buffer(llama: Any) -> None:
    ids = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    want, full_cache = _hf_prefill(llama, ids)
    pc = build_prefix_cache(llama, model_id="tiny", block_size=16, cpu_bytes=1 << 24)
    pc.store(ids, hf.extract(full_cache, 40), tenant_salt=b"t")
    runner = StaticRunner(llama, max_tokens=64)
    match = pc.match(ids, tenant_salt=b"t")
    prefix = pc.load(match, out=runner.kv)
    assert prefix.shape[0] == 32 and prefix.data_ptr() == runner.kv.data_ptr()
    torch.testing.assert_close(runner(ids[32:], 32), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [{}, {"attention": "split", "split_chunk": 8}])
@pytest.mark.parametrize(("prefix", "total"), [(32, 48), (4, 40), (15, 17), (0, 30)])
def test_gemma3_sliding_window_suffix_matches_hf(options: dict[str, Any], prefix: int, total: int) -> None:
    """Gemma-3: per-head q/k norms, one rope per layer type, sandwich norms, and sliding-window layers
    (window 16 here) whose queries see only the last 16 keys — prefixes inside, across and far beyond
    the window, and suffixes longer than it."""
    gemma = tiny_gemma3(initializer_range=0.1)
    ids = torch.randint(3, 384, (total,), generator=torch.Generator().manual_seed(6)).tolist()
    want, full_cache = _hf_prefill(gemma, ids)
    full_kv = hf.extract(full_cache, total)
    runner = StaticRunner(gemma, max_tokens=64, **options)
    runner.kv[:prefix] = full_kv[:prefix]
    torch.testing.assert_close(runner(ids[prefix:], prefix), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(runner.kv[prefix:total], full_kv[prefix:], atol=1e-5, rtol=0)


def test_gemma3_engine_hit_through_the_runner_equals_plain_engine() -> None:
    from cachelm.engine.engine import Engine, SamplingParams

    gemma = tiny_gemma3(initializer_range=0.1)
    pc = build_prefix_cache(gemma, model_id="tiny-gemma", block_size=16, cpu_bytes=1 << 24)
    fast = Engine(gemma, None, prefix_cache=pc, static_runner=StaticRunner(gemma, max_tokens=128))
    ids = torch.randint(3, 384, (50,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_new_tokens=6)
    want = Engine(gemma, None).generate(ids, params)
    fast.generate(ids, params)
    again = fast.generate(ids, params)
    assert again.num_cached_tokens == 48 and again.token_ids == want.token_ids
    assert again.first_logits is not None and want.first_logits is not None
    torch.testing.assert_close(again.first_logits, want.first_logits, atol=1e-4, rtol=0)


def test_rejects_what_it_cannot_run(llama: Any) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ConfigError, match="Llama-architecture or Gemma-3"):
        StaticRunner(qwen, max_tokens=8)
    with pytest.raises(ConfigError, match="Llama-architecture models only"):
        StaticRunner(tiny_gemma3(), max_tokens=8, fuse_weights=True)
    with pytest.raises(ConfigError, match="soft-capping"):
        StaticRunner(tiny_gemma3(attn_logit_softcapping=50.0), max_tokens=8)
    runner = StaticRunner(llama, max_tokens=8)
    with pytest.raises(ConfigError, match="`start`"):
        runner([1, 2, 3], 6)


def test_engine_with_static_runner_equals_plain_engine(llama: Any) -> None:
    from cachelm.engine.engine import Engine, SamplingParams
    from cachelm.engine.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    pc = build_prefix_cache(llama, model_id="tiny", block_size=16, cpu_bytes=1 << 24)
    fast = Engine(llama, tok, prefix_cache=pc, static_runner=StaticRunner(llama, max_tokens=128))
    plain = Engine(llama, tok)
    ids = torch.randint(3, 384, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_new_tokens=8)
    first = fast.generate(ids, params)
    again = fast.generate(ids, params)
    want = plain.generate(ids, params)
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 48
    for got in (first, again):
        assert got.token_ids == want.token_ids
        assert got.first_logits is not None and want.first_logits is not None
        torch.testing.assert_close(got.first_logits, want.first_logits, atol=1e-4, rtol=0)
    longer = fast.generate(torch.randint(3, 384, (200,)).tolist(), params)  # beyond the buffer: HF path
    assert len(longer.token_ids) == 8


def test_static_prefill_builds_its_decode_cache_lazily_and_refuses_a_stale_buffer(llama: Any) -> None:
    """The runner's prefill returns logits first and copies the buffer into a DynamicCache on first use
    (off the time to the first token); once a later prefill has reused the buffer, the earlier prefill's
    cache can no longer be built and says so instead of returning the other prompt's KV."""
    from cachelm.engine.engine import Engine

    fast = Engine(llama, None, static_runner=StaticRunner(llama, max_tokens=128))
    a = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    b = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    first = fast.prefill(a)
    want_logits, want_cache = _hf_prefill(llama, a)
    torch.testing.assert_close(first.logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(hf.extract(first.cache, 40), hf.extract(want_cache, 40), atol=1e-5, rtol=0)
    stale = fast.prefill(a)
    fast.prefill(b)
    with pytest.raises(ConfigError, match="overwritten by a later prefill"):
        _ = stale.cache
    assert first.cache.get_seq_length() == 40  # built before the reuse: still valid
