"""KV reuse on CUDA: GPU and pinned-CPU tiers, and the CUDA-graph static runner, equal recompute."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cachelm.engine.engine import Engine, SamplingParams, build_prefix_cache
from cachelm.engine.static_runner import StaticRunner
from cachelm.engine.tiny import tiny_gemma3, tiny_llama, tiny_tokenizer
from cachelm.kv import hf

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_llama(initializer_range=0.1).to("cuda")


@pytest.mark.parametrize(("gpu_bytes", "cpu_bytes"), [(1 << 24, 0), (0, 1 << 24), (2 * 16384, 1 << 24)])
def test_gpu_and_pinned_tiers_equal_recompute(llama: Any, gpu_bytes: int, cpu_bytes: int) -> None:
    tok = tiny_tokenizer()
    pc = build_prefix_cache(llama, model_id="tiny", block_size=16, gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes)
    engine, base = Engine(llama, tok, prefix_cache=pc), Engine(llama, tok)
    ids = torch.randint(3, 384, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=8)
    engine.generate(ids, params)
    pc.flush()
    reused, fresh = engine.generate(ids, params), base.generate(ids, params)
    assert reused.num_cached_tokens == 64
    assert reused.token_ids == fresh.token_ids
    assert reused.first_logits is not None and fresh.first_logits is not None
    torch.testing.assert_close(reused.first_logits, fresh.first_logits, atol=1e-4, rtol=0)
    if cpu_bytes:
        assert all(t.is_pinned() for b in pc.tiers[-1]._blocks.values() for t in b.tensors.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("arch", "attention", "options"),
    [
        ("llama", "sdpa", {}),
        ("llama", "split", {}),
        ("llama", "split", {"fuse_weights": True}),
        ("llama", "split", {"compile": True}),  # packed weights + torch.compile'd layer math, graphed
        ("gemma3", "sdpa", {}),  # sliding-window layers (window 16) over a 32-token prefix
        ("gemma3", "split", {}),
    ],
)
def test_cuda_graph_runner_equals_hf(arch: str, attention: str, options: dict[str, bool]) -> None:
    # bf16: the flash kernel of the split path takes only half precision; tolerance of bf16 rounding.
    build = tiny_llama if arch == "llama" else tiny_gemma3
    model = build(initializer_range=0.1).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 384, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = hf.new_cache(model)
    with torch.inference_mode():
        want = (
            model(input_ids=torch.tensor([ids], device="cuda"), past_key_values=cache).logits[0, -1].float()
        )
    runner = StaticRunner(model, max_tokens=64, attention=attention, split_chunk=8, **options)
    runner.kv[:32] = hf.extract(cache, 48)[:32]
    for _ in range(3):  # capture, then replays
        torch.testing.assert_close(runner(ids[32:], 32), want, atol=0.05, rtol=0)
    other = torch.randint(3, 384, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    runner(other, 32)  # a replay with new inputs must not return the old logits
    assert not torch.allclose(runner(other, 32), want, atol=0.05)
