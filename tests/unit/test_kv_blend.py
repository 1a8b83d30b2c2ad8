"""Non-prefix reuse: exact rotary re-positioning; CacheBlend's selective recompute vs full recompute."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cachelm.engine.tiny import tiny_gemma3, tiny_llama
from cachelm.errors import ConfigError
from cachelm.kv import hf
from cachelm.kv.blend import Segment, blend_prefill, layer_inv_freqs, prefill_chunk, reposition

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _full(model: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    cache = hf.new_cache(model)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache).logits[0, -1].float()
    return logits, hf.extract(cache, len(ids))


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_llama(),
        lambda: tiny_llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
        lambda: tiny_gemma3(),  # two rope bases (sliding / full layers)
    ],
)
def test_reposition_is_exact_for_layer0_keys(make: Any) -> None:
    # Layer-0 keys depend only on token and position, so moving them must reproduce them exactly.
    model = make()
    prefix, chunk = _ids(7, 1), _ids(12, 2)
    alone = prefill_chunk(model, chunk)
    _, in_context = _full(model, prefix + chunk)
    moved = reposition(alone, len(prefix), layer_inv_freqs(model))
    torch.testing.assert_close(moved[:, 0], in_context[len(prefix) :, 0], atol=1e-5, rtol=0)
    assert torch.equal(reposition(alone, 0, layer_inv_freqs(model)), alone)


def test_dynamic_rope_is_refused() -> None:
    model = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="re-positioned"):
        layer_inv_freqs(model)


def test_full_recompute_equals_prefill_and_reuse_error_shrinks_with_recompute() -> None:
    model = tiny_llama(initializer_range=0.1)
    system, doc, question = _ids(9, 3), _ids(40, 4), _ids(6, 5)
    want, want_kv = _full(model, system + doc + question)
    doc_kv = prefill_chunk(model, doc)

    def run(ratio: float) -> Any:
        segments = [Segment(token_ids=system), Segment(token_ids=doc, kv=doc_kv), Segment(token_ids=question)]
        return blend_prefill(model, segments, recompute_ratio=ratio)

    full = run(1.0)
    torch.testing.assert_close(full.logits, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(full.kv, want_kv, atol=1e-4, rtol=0)
    assert full.num_reused == 0 and len(full.recomputed) == 40
    errors = {r: (run(r).logits - want).abs().max().item() for r in (0.0, 0.3)}
    assert errors[0.3] < errors[0.0]
    partial = run(0.3)
    assert partial.num_reused == 40 - 12 and len(partial.recomputed) == 12
    assert all(9 <= p < 49 for p in partial.recomputed)  # only document positions are candidates
    assert partial.compute_fraction == pytest.approx((55 + 3 * (55 - 28)) / (4 * 55))  # 4 layers


def test_blended_kv_continues_generation() -> None:
    model = tiny_llama(initializer_range=0.1)
    system, doc, question = _ids(5, 6), _ids(20, 7), _ids(4, 8)
    result = blend_prefill(
        model,
        [
            Segment(token_ids=system),
            Segment(token_ids=doc, kv=prefill_chunk(model, doc)),
            Segment(token_ids=question),
        ],
        recompute_ratio=1.0,
    )
    cache = hf.new_cache(model)
    hf.restore(cache, result.kv, hf_layout(model))
    nxt = int(result.logits.argmax())
    with torch.inference_mode():
        got = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache).logits[0, -1]
        want = model(input_ids=torch.tensor([system + doc + question + [nxt]])).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def hf_layout(model: Any) -> Any:
    from cachelm.kv.layout import KVLayout

    return KVLayout.from_model(model)


def test_bad_arguments() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match="`recompute_ratio`"):
        blend_prefill(model, [Segment(token_ids=[1, 2])], recompute_ratio=2)
    with pytest.raises(ConfigError, match="last segment"):
        blend_prefill(model, [Segment(token_ids=[1, 2], kv=prefill_chunk(model, [1, 2]))])
    with pytest.raises(ConfigError, match="Llama-architecture"):
        blend_prefill(tiny_gemma3(), [Segment(token_ids=[1, 2])])
