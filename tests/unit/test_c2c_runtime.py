"""The C2C runtime on tiny real models: reuse of the fused cache matches recomputation, batches match
single prompts, streaming matches batch generation, and gradients reach only the fuser."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cachelm.c2c import pair
from cachelm.errors import ConfigError
from tests.unit.test_c2c_support import (
    randomize,
    receiver_model,
    receiver_tokenizer,
    sharer_model,
    sharer_tokenizer,
)

PROMPTS = [
    "Question: Which café is 東京?\nAnswer:",
    "Question: A student measures the mass of a rock with a balance. What unit? 😀\nAnswer:",
]
OPTIONS = [["carbon dioxide", "naïve jalapeño"], ["grams", "degrees Celsius", "light"]]


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    # A sliding window (8) shorter than the prompts: the sharer's cache must still cover every token.
    return (
        pair.from_objects("tiny-llama", receiver_model(), receiver_tokenizer()),
        pair.from_objects("tiny-gemma3", sharer_model(sliding_window=8), sharer_tokenizer()),
    )


def _fuser(models: tuple[Any, Any], **kw: Any) -> Any:
    fuser = pair.new_fuser(*models, hidden_dim=16, **kw)
    randomize(fuser)
    with torch.no_grad():
        fuser.gate_logits.fill_(1.0)
    return fuser.eval()


def _full_forward_loglik(model: Any, tok: Any, prompt: str, option: str) -> float:
    p = tok(prompt)["input_ids"]
    c = tok(" " + option, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))


def test_receiver_alone_scores_match_one_full_forward(models: tuple[Any, Any]) -> None:
    receiver, _ = models
    scores = pair.pipeline(receiver).score(PROMPTS, OPTIONS)
    for prompt, opts, row in zip(PROMPTS, OPTIONS, scores, strict=True):
        for opt, got in zip(opts, row, strict=True):
            assert got == pytest.approx(
                _full_forward_loglik(receiver.model, receiver.tokenizer, prompt, opt), abs=1e-4
            )


def test_sharer_alone_with_sliding_window_matches_one_full_forward(models: tuple[Any, Any]) -> None:
    _, sharer = models
    scores = pair.pipeline(sharer).score(PROMPTS, OPTIONS)
    want = _full_forward_loglik(sharer.model, sharer.tokenizer, PROMPTS[1], OPTIONS[1][0])
    assert scores[1][0] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("alignment", ["last", "mean"])
@pytest.mark.parametrize("positions", ["receiver", "own"])
def test_a_batch_scores_like_its_prompts_one_by_one(
    models: tuple[Any, Any], alignment: str, positions: str
) -> None:
    fused = pair.pipeline(*models, _fuser(models, token_alignment=alignment, sharer_positions=positions))
    batch = fused.score(PROMPTS, OPTIONS)
    single = [fused.score([p], [o])[0] for p, o in zip(PROMPTS, OPTIONS, strict=True)]
    for b_row, s_row in zip(batch, single, strict=True):
        assert b_row == pytest.approx(s_row, abs=1e-4)
    assert batch != pair.pipeline(models[0]).score(PROMPTS, OPTIONS)  # the sharer changed something


def test_prepare_aligns_the_context_and_keeps_the_last_token_for_the_receiver(
    models: tuple[Any, Any],
) -> None:
    receiver, _ = models
    fused = pair.pipeline(*models, _fuser(models))
    batch = fused.prepare(PROMPTS)
    ids = receiver.tokenizer(PROMPTS[0])["input_ids"]
    assert int(batch.last_token[0]) == ids[-1]
    assert int(batch.context_lengths[0]) == len(ids) - 1
    assert batch.alignment is not None and batch.sharer_positions is not None
    real = batch.receiver_mask.bool()
    assert torch.allclose(batch.alignment.sum(-1)[real], torch.ones(int(real.sum())))
    assert (batch.alignment.sum(-1)[~real] == 0).all()
    # identical position ids: the sharer's positions are receiver positions, never beyond its context
    for b in range(len(PROMPTS)):
        pos = batch.sharer_positions[b][batch.sharer_mask[b].bool()]  # type: ignore[index]
        assert int(pos.max()) < int(batch.context_lengths[b])
        assert torch.equal(pos, pos.sort().values)


def test_streaming_yields_what_batch_generation_returns(models: tuple[Any, Any]) -> None:
    fused = pair.pipeline(*models, _fuser(models))
    batch = fused.generate(PROMPTS, max_new_tokens=6)
    for prompt, text in zip(PROMPTS, batch, strict=True):
        assert "".join(fused.stream(prompt, max_new_tokens=6)) == text
    steps = list(fused.generate_ids(PROMPTS[:1], max_new_tokens=4, stop_at_eos=False))
    assert len(steps) == 4


def test_loss_gradients_reach_the_fuser_only(models: tuple[Any, Any]) -> None:
    receiver, sharer = models
    fuser = _fuser(models).train()
    fused = pair.pipeline(receiver, sharer, fuser)
    responses = [receiver.tokenizer(" " + o[0], add_special_tokens=False)["input_ids"] for o in OPTIONS]
    loss = fused.loss(PROMPTS, responses)
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fuser.key_projectors[0].parameters())
    assert all(p.grad is None for p in receiver.model.parameters())
    fuser.zero_grad()


@pytest.mark.parametrize("fuse_span", ["context", "all"])
def test_responses_and_options_on_one_prefill_match_separate_passes(
    models: tuple[Any, Any], fuse_span: str
) -> None:
    # Training scores a batch's responses and its questions' options on one fused prefill; each must
    # equal what `loss` and `option_logprobs` compute on their own.
    receiver, sharer = models
    kw = {"fuse_span": fuse_span, "token_alignment": "causal" if fuse_span == "all" else "last"}
    fused = pair.pipeline(receiver, sharer, _fuser(models, **kw))
    responses = [receiver.tokenizer(" " + o[0], add_special_tokens=False)["input_ids"] for o in OPTIONS]
    option_rows, option_suffixes = fused.option_suffixes(OPTIONS[1:])
    rows = [0, 1] + [1 + r for r in option_rows]
    with torch.no_grad():
        logp, mask = fused.token_logprobs(PROMPTS, rows, responses + option_suffixes)
        alone_loss = fused.loss(PROMPTS, responses)
        alone_options = fused.option_logprobs(PROMPTS[1:], OPTIONS[1:])
    assert option_rows == [0, 0, 0] and mask[:2].sum() == sum(len(r) for r in responses)
    assert float(-logp[:2].sum() / mask[:2].sum()) == pytest.approx(float(alone_loss), abs=1e-4)
    assert torch.allclose(logp[2:].sum(-1), alone_options, atol=1e-4)


def test_bad_inputs_are_rejected(models: tuple[Any, Any]) -> None:
    receiver, sharer = models
    with pytest.raises(ConfigError, match="together"):
        pair.pipeline(receiver, sharer, None)
    alone = pair.pipeline(receiver)
    with pytest.raises(ConfigError, match="`prompts`"):
        alone.score([], [])
    with pytest.raises(ConfigError, match="`options`"):
        alone.score(PROMPTS, [["a"]])
    with pytest.raises(ConfigError, match="fewer than 2 tokens"):
        alone.score(["Q"], [["a"]])
    with pytest.raises(ConfigError, match="`rows` must index"):
        alone.token_logprobs(PROMPTS, [0, 2], [[5], [6]])
    with pytest.raises(ConfigError, match="`suffixes`"):
        alone.token_logprobs(PROMPTS, [0], [[]])
    for bad in (0, True, 2.0):
        with pytest.raises(ConfigError, match="`max_new_tokens`"):
            alone.generate(PROMPTS, bad)  # type: ignore[arg-type]
