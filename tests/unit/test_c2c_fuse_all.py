"""`fuse_span="all"`: every position fused, causally. A fuser with closed gates is the receiver alone; a
token's logits never depend on text after it; batches, scoring, generation and streaming agree."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cachelm.c2c import pair
from cachelm.c2c.align import align_causal, align_tokens, encode_with_offsets
from cachelm.c2c.config import FuserConfig
from cachelm.errors import ConfigError
from tests.unit.test_c2c_runtime import OPTIONS, PROMPTS
from tests.unit.test_c2c_support import (
    randomize,
    receiver_model,
    receiver_tokenizer,
    sharer_model,
    sharer_tokenizer,
)


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return (
        pair.from_objects("tiny-llama", receiver_model(), receiver_tokenizer()),
        pair.from_objects("tiny-gemma3", sharer_model(sliding_window=8), sharer_tokenizer()),
    )


def _fuser(models: tuple[Any, Any], gate: float = 1.0) -> Any:
    fuser = pair.new_fuser(*models, hidden_dim=16, token_alignment="causal", fuse_span="all")
    randomize(fuser)
    with torch.no_grad():
        fuser.gate_logits.fill_(gate)
    return fuser.eval()


def test_all_needs_the_causal_alignment(models: tuple[Any, Any]) -> None:
    fuser = _fuser(models)
    raw = fuser.config.to_json().replace('"causal"', '"last"')
    with pytest.raises(ConfigError, match="causal"):
        FuserConfig.from_json(raw)
    with pytest.raises(ConfigError, match="align_causal"):
        align_tokens([(0, 1)], [(0, 1)], "causal")


def test_closed_gates_score_like_the_receiver_alone(models: tuple[Any, Any]) -> None:
    closed = pair.pipeline(*models, _fuser(models, gate=-1.0)).score(PROMPTS, OPTIONS)
    alone = pair.pipeline(models[0]).score(PROMPTS, OPTIONS)
    for c_row, a_row in zip(closed, alone, strict=True):
        assert c_row == pytest.approx(a_row, abs=1e-4)


def test_open_gates_change_the_scores_and_batches_match_single_prompts(models: tuple[Any, Any]) -> None:
    fused = pair.pipeline(*models, _fuser(models))
    batch = fused.score(PROMPTS, OPTIONS)
    single = [fused.score([p], [o])[0] for p, o in zip(PROMPTS, OPTIONS, strict=True)]
    for b_row, s_row in zip(batch, single, strict=True):
        assert b_row == pytest.approx(s_row, abs=1e-4)
    alone = pair.pipeline(models[0]).score(PROMPTS, OPTIONS)
    assert (
        max(abs(x - y) for b, a in zip(batch, alone, strict=True) for x, y in zip(b, a, strict=True)) > 1e-2
    )


def test_a_tokens_logits_do_not_depend_on_later_text(models: tuple[Any, Any]) -> None:
    """Shared leading tokens get identical logits whatever follows — including where the sharer's
    tokenisation of the longer text merges across the cut ("stu"+"de" vs "stu"+"de"+"nts" →
    "stu","de","nts" vs "st","ude"...), which a span-only rule over the whole text would leak."""
    fused = pair.pipeline(*models, _fuser(models))
    tok, s_tok = models[0].tokenizer, models[1].tokenizer
    prompt = "Answer:"
    merged_somewhere = False
    for short_text, long_text in ((" stude", " students"), (" and", " ands"), (" grams", " grams of rock")):
        short = tok(short_text, add_special_tokens=False)["input_ids"]
        longer = tok(long_text, add_special_tokens=False)["input_ids"]
        assert longer[: len(short)] == short  # the receiver reads the same leading tokens
        s_short = s_tok(prompt + short_text)["input_ids"]
        merged_somewhere |= s_tok(prompt + long_text)["input_ids"][: len(s_short)] != s_short
        with torch.no_grad():
            a, _, _ = fused._continuation_logits([prompt], [short])
            b, _, _ = fused._continuation_logits([prompt], [longer])
        # One row, no padding: columns line up from the start.
        torch.testing.assert_close(a[0], b[0, : a.shape[1]], atol=1e-4, rtol=0)
    assert merged_somewhere  # the test exercises a sharer merge across the cut


def test_causal_alignment_reads_only_stable_sharer_tokens(models: tuple[Any, Any]) -> None:
    _, sharer = models
    text = "Which café is 東京? grams"
    r_ids, r_spans = encode_with_offsets(models[0].tokenizer, text)
    s_ids, s_spans, rows = align_causal(r_spans, sharer.tokenizer, text)
    assert len(rows) == len(r_ids) and all(len(r) == 1 for r in rows)
    for (_, end), (j,) in zip(r_spans, rows, strict=True):
        assert s_spans[j][1] <= end  # never a character the receiver token has not read
        prefix_ids, _ = encode_with_offsets(sharer.tokenizer, text[:end])
        assert prefix_ids[: j + 1] == s_ids[: j + 1]  # the same tokens, so the same KV, as text[:end]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_generation_is_greedy_on_the_fully_fused_forward(models: tuple[Any, Any]) -> None:
    """Each generated token equals the argmax of a from-scratch fused forward over prompt + tokens so far
    (the incremental path keeps the receiver's cache and re-reads the sharer)."""
    fused = pair.pipeline(*models, _fuser(models))
    steps = list(fused.generate_ids(PROMPTS, max_new_tokens=4, stop_at_eos=False))
    generated = torch.stack(steps, dim=1).tolist()  # (B, 4)
    for b, prompt in enumerate(PROMPTS):
        for k in range(4):
            with torch.no_grad():
                logits, _ = fused._forward_all(fused.prepare_full([prompt], [generated[b][:k]]))
            assert int(logits[0, -1].argmax()) == generated[b][k]
    text = "".join(fused.stream(PROMPTS[0], max_new_tokens=4))
    assert text == fused.generate([PROMPTS[0]], max_new_tokens=4)[0]


def test_loss_trains_the_fuser_only_and_matches_scoring(models: tuple[Any, Any]) -> None:
    fuser = _fuser(models).train()
    fused = pair.pipeline(*models, fuser)
    tok = models[0].tokenizer
    response = tok(" grams", add_special_tokens=False)["input_ids"]
    loss = fused.loss([PROMPTS[1]], [response])
    loss.backward()  # type: ignore[no-untyped-call]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fuser.parameters())
    assert all(p.grad is None for p in models[0].model.parameters())
    fuser.eval()
    with torch.no_grad():
        nll = float(fused.loss([PROMPTS[1]], [response])) * len(response)
    assert -nll == pytest.approx(fused.score([PROMPTS[1]], [["grams"]])[0][0], abs=1e-4)


@pytest.mark.parametrize("receiver_first", [True, False], ids=["llama-receiver", "gemma3-receiver"])
def test_padding_rows_attend_to_themselves_and_real_rows_are_unchanged(
    models: tuple[Any, Any], receiver_first: bool
) -> None:
    """A left-padded row of a whole-text forward would attend to nothing (NaN gradients on some CUDA
    kernels); `_full_text_masks` lets it attend to itself. Every mask row then sees something, the real
    queries' rows are the model's own, and a padded batch gives each prompt's logits alone — for a Llama
    receiver and for a Gemma-3 receiver, whose sliding-window layers get their own mask."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_masks_for_generate

    from cachelm.c2c.runtime import _full_text_masks

    receiver, sharer = models if receiver_first else models[::-1]
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=16, token_alignment="causal", fuse_span="all")
    randomize(fuser)
    fused = pair.pipeline(receiver, sharer, fuser.eval())
    batch = fused.prepare_full(PROMPTS, [[], []])
    assert bool((batch.receiver_mask == 0).any())  # the shorter prompt is padded

    built = _full_text_masks(receiver.model, batch, DynamicCache())
    own = create_masks_for_generate(
        config=receiver.model.config,
        inputs_embeds=receiver.model.get_input_embeddings()(batch.receiver_ids),
        attention_mask=batch.receiver_mask,
        past_key_values=DynamicCache(),
        position_ids=batch.receiver_positions,
    )
    masks = built if isinstance(built, dict) else {"full_attention": built}
    owns = own if isinstance(own, dict) else {"full_attention": own}
    assert set(masks) == set(owns) and (len(masks) > 1) == (not receiver_first)  # Gemma-3: two kinds
    real = batch.receiver_mask.bool()[:, None, :]  # (B, 1, T) the real queries
    for kind, mask in masks.items():
        assert mask.dtype == torch.bool and bool(mask.any(-1).all()), kind  # no empty row
        empty = ~owns[kind].any(-1)
        assert bool(empty.any()) and not bool((empty & real).any()), kind  # padding rows, only, were empty
        assert torch.equal(mask[real], owns[kind][real]), kind  # real rows untouched

    with torch.no_grad():
        logits, _ = fused._forward_all(batch)
        for b, prompt in enumerate(PROMPTS):
            alone, _ = fused._forward_all(fused.prepare_full([prompt], [[]]))
            n = alone.shape[1]
            assert torch.allclose(logits[b, -n:], alone[0], atol=1e-4), b
