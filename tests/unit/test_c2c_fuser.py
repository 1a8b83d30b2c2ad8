"""The fuser: shapes, gates, exact reproduction of the receiver with closed gates, training and resume."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch

from cachelm.c2c import pair
from cachelm.c2c.data import TrainExample
from cachelm.c2c.fuser import C2CFuser
from cachelm.c2c.train import OptionObjective, TrainConfig, lr_factor, temperature, train_fuser
from cachelm.errors import ConfigError, TrainingError
from tests.unit.test_c2c_support import (
    randomize,
    receiver_model,
    receiver_tokenizer,
    sharer_model,
    sharer_tokenizer,
)

PROMPTS = ["Question: Which café is 東京?\nAnswer:", "Question: What melts ice?\nAnswer:"]


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return (
        pair.from_objects("tiny-llama", receiver_model(), receiver_tokenizer()),
        pair.from_objects("tiny-gemma3", sharer_model(), sharer_tokenizer()),
    )


def _fuser(models: tuple[Any, Any], **kw: Any) -> C2CFuser:
    receiver, sharer = models
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=16, **kw)
    randomize(fuser)  # non-zero projections, so an open gate really changes the cache
    with torch.no_grad():
        fuser.gate_logits.fill_(1.0)
    return fuser


def test_fused_cache_has_the_receivers_shapes_and_unfused_layers_are_untouched(
    models: tuple[Any, Any],
) -> None:
    fuser = _fuser(models)
    assert fuser.config.layer_map == ((1, 0), (2, 1), (3, 2))  # terminal: 4 receiver layers, 3 sharer
    b, t, s = 2, 5, 7
    rec = [(torch.randn(b, 2, t, 16), torch.randn(b, 2, t, 16)) for _ in range(4)]
    sh = [(torch.randn(b, 1, s, 32), torch.randn(b, 1, s, 32)) for _ in range(3)]
    align = torch.softmax(torch.randn(b, t, s), -1)
    fused = fuser.eval().fuse(rec, sh, align)
    assert fused[0][0] is rec[0][0] and fused[0][1] is rec[0][1]
    for (k, v), (rk, rv) in zip(fused[1:], rec[1:], strict=True):
        assert k.shape == rk.shape and v.shape == rv.shape
        assert not torch.equal(k, rk) and not torch.equal(v, rv)
    with pytest.raises(ConfigError, match="receiver"):
        fuser.fuse(rec[:3], sh, align)


def test_gates_are_hard_at_inference_and_gumbel_in_training(models: tuple[Any, Any]) -> None:
    fuser = _fuser(models)
    with torch.no_grad():
        fuser.gate_logits.copy_(torch.tensor([2.0, -0.5, 0.1]))
    assert fuser.eval().gates().tolist() == [1.0, 0.0, 1.0]
    fuser.train()
    fuser.temperature = 1.0
    torch.manual_seed(0)
    soft = torch.stack([fuser.gates() for _ in range(200)])
    assert ((soft > 0) & (soft < 1)).all()
    assert soft[:, 0].mean() > soft[:, 1].mean()  # a larger logit opens the gate more often
    fuser.temperature = 1e-3
    sharp = torch.stack([fuser.gates() for _ in range(200)])
    assert ((sharp < 1e-3) | (sharp > 1 - 1e-3)).float().mean() > 0.95


def test_all_gates_closed_reproduces_the_receiver_exactly(models: tuple[Any, Any]) -> None:
    receiver, sharer = models
    fuser = _fuser(models)
    options = [["carbon dioxide", "heat"], ["the sun", "a rock", "ice"]]
    alone = pair.pipeline(receiver).score(PROMPTS, options)
    with torch.no_grad():
        fuser.gate_logits.fill_(-1.0)
    closed = pair.pipeline(receiver, sharer, fuser.eval()).score(PROMPTS, options)
    assert closed == alone  # bit for bit
    assert pair.pipeline(receiver, sharer, fuser.eval()).generate(PROMPTS, 5) == pair.pipeline(
        receiver
    ).generate(PROMPTS, 5)
    with torch.no_grad():
        fuser.gate_logits.fill_(1.0)
    opened = pair.pipeline(receiver, sharer, fuser.eval()).score(PROMPTS, options)
    assert opened != alone


def test_size_counts_every_parameter(models: tuple[Any, Any]) -> None:
    fuser = _fuser(models)
    n = sum(p.numel() for p in fuser.parameters())
    assert fuser.num_bytes(torch.bfloat16) == 2 * n
    assert fuser.num_bytes(torch.float32) == 4 * n


def test_schedules() -> None:
    assert lr_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert temperature(0, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert temperature(9, 10, 1.0, 0.1) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="`tau_end`"):
        TrainConfig(tau_start=0.1, tau_end=1.0)
    with pytest.raises(ConfigError, match="`steps`"):
        TrainConfig(steps=0)


EXAMPLES = [
    TrainExample(prompt=PROMPTS[0], response="a café in Tokyo", source="t"),
    TrainExample(prompt=PROMPTS[1], response="heat from the sun", source="t"),
    TrainExample(prompt="Question: What do magnets attract?\nAnswer:", response="iron", source="t"),
]


@pytest.mark.slow
def test_training_lowers_the_loss_and_touches_only_the_fuser(models: tuple[Any, Any]) -> None:
    receiver, sharer = models
    before = {k: v.clone() for k, v in receiver.model.state_dict().items()}
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=16)
    info = train_fuser(
        pair.pipeline(receiver, sharer, fuser),
        EXAMPLES,
        TrainConfig(steps=30, batch_size=3, lr=1e-2, warmup_fraction=0.1),
        progress=False,
    )
    assert info["final_loss"] < info["first_loss"]
    assert not fuser.training
    assert all(torch.equal(v, receiver.model.state_dict()[k]) for k, v in before.items())


def test_training_refuses_unfrozen_models(models: tuple[Any, Any]) -> None:
    receiver, sharer = models
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=8)
    receiver.model.lm_head.weight.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match="frozen"):
            train_fuser(
                pair.pipeline(receiver, sharer, fuser), EXAMPLES, TrainConfig(steps=1), progress=False
            )
    finally:
        receiver.model.lm_head.weight.requires_grad_(False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resumed_training_ends_where_an_uninterrupted_run_ends(
    models: tuple[Any, Any], tmp_path: Any, device: str
) -> None:
    """On CUDA too: the saved state, RNG states included, must load back (a resumed H100 run once failed
    because the RNG states came back on the GPU)."""
    receiver, sharer = models
    if device == "cuda":
        receiver = pair.from_objects("tiny-llama", receiver_model().cuda(), receiver_tokenizer())
        sharer = pair.from_objects("tiny-gemma3", sharer_model().cuda(), sharer_tokenizer())
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-2, save_every=3)

    torch.manual_seed(1)
    full = pair.new_fuser(receiver, sharer, hidden_dim=8).to(device)
    torch.manual_seed(5)
    train_fuser(pair.pipeline(receiver, sharer, full), EXAMPLES, cfg, progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(step: int, loss: float) -> None:
        if step == 4:
            raise Stop

    state = tmp_path / "state.pt"
    torch.manual_seed(1)
    first = pair.new_fuser(receiver, sharer, hidden_dim=8).to(device)
    torch.manual_seed(5)
    with pytest.raises(Stop):
        train_fuser(
            pair.pipeline(receiver, sharer, first),
            EXAMPLES,
            cfg,
            state_path=state,
            progress=False,
            on_step=stop_at_4,
        )
    # The summary's time adds the saved steps' time: mark it with an hour the run could not have taken.
    saved = torch.load(state, map_location="cpu", weights_only=False)
    saved["seconds"] = 3600.0
    torch.save(saved, state)
    torch.manual_seed(1)
    resumed = pair.new_fuser(receiver, sharer, hidden_dim=8).to(device)
    torch.manual_seed(123)  # whatever the global RNG holds now, the saved state is restored
    began = time.perf_counter()
    info = train_fuser(
        pair.pipeline(receiver, sharer, resumed), EXAMPLES, cfg, state_path=state, progress=False
    )
    assert info["steps"] == 6 and info["resumed_at_step"] == 3
    assert 3600.0 < info["seconds"] <= 3600.0 + time.perf_counter() - began
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        if device == "cpu":
            assert torch.allclose(a, b, atol=1e-6), name
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_padding_is_left_alone_and_a_nan_in_sharer_padding_does_not_spread(models: tuple[Any, Any]) -> None:
    """Padded receiver positions keep their own K/V; whatever a model wrote at padded sharer positions
    (NaN included: an alignment weight of 0 does not cancel it) never reaches the fused cache."""
    fuser = _fuser(models).eval()
    b, t, s = 2, 5, 7
    rec = [(torch.randn(b, 2, t, 16), torch.randn(b, 2, t, 16)) for _ in range(4)]
    sh = [(torch.randn(b, 1, s, 32), torch.randn(b, 1, s, 32)) for _ in range(3)]
    r_mask = torch.ones(b, t, dtype=torch.long)
    r_mask[1, :2] = 0  # row 1 is left-padded by two receiver positions
    s_mask = torch.ones(b, s, dtype=torch.long)
    s_mask[1, :3] = 0  # and by three sharer positions
    align = torch.softmax(torch.randn(b, t, s), -1) * s_mask[:, None, :]
    align = align / align.sum(-1, keepdim=True)
    poisoned = [(k.clone(), v.clone()) for k, v in sh]
    for k, v in poisoned:
        k[1, :, :3] = float("nan")
        v[1, :, :3] = float("nan")
    clean = fuser.fuse(rec, sh, align, receiver_mask=r_mask, sharer_mask=s_mask)
    fused = fuser.fuse(rec, poisoned, align, receiver_mask=r_mask, sharer_mask=s_mask)
    for (k, v), (ck, cv), (rk, rv) in zip(fused, clean, rec, strict=True):
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        assert torch.allclose(k, ck) and torch.allclose(v, cv)
        assert torch.equal(k[1, :, :2], rk[1, :, :2]) and torch.equal(v[1, :, :2], rv[1, :, :2])
    unmasked = fuser.fuse(rec, poisoned, align)
    assert torch.isnan(unmasked[1][0][1]).any()  # without the masks the NaN would spread


def _poisoned_receiver(text: str) -> Any:
    """The tiny receiver with NaN in the embedding of `text`'s first token: any row reading it gives NaN."""
    model = receiver_model()
    token = receiver_tokenizer()(text, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    return pair.from_objects("tiny-llama-poisoned", model, receiver_tokenizer())


def test_a_step_with_a_non_finite_loss_is_skipped_and_counted(models: tuple[Any, Any]) -> None:
    receiver = _poisoned_receiver(" do")  # " d": only the third example has it
    sharer = models[1]
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=8)
    cfg = TrainConfig(steps=6, batch_size=1, lr=1e-2, max_skipped_fraction=0.5)
    info = train_fuser(pair.pipeline(receiver, sharer, fuser), EXAMPLES, cfg, progress=False)
    # One example in three reads the poisoned token: two of the six steps are skipped, the rest train.
    assert info["skipped_steps"] == 2
    assert info["first_skipped"]["examples"] == [2] and math.isnan(info["first_skipped"]["loss"])
    assert all(torch.isfinite(p).all() for p in fuser.parameters())
    assert math.isfinite(info["final_loss"])
    fresh = pair.new_fuser(receiver, sharer, hidden_dim=8)
    with pytest.raises(TrainingError, match="non-finite"):
        train_fuser(
            pair.pipeline(receiver, sharer, fresh),
            EXAMPLES,
            TrainConfig(steps=6, batch_size=1, max_skipped_fraction=0.1),
            progress=False,
        )


MC_EXAMPLES = [
    TrainExample(
        prompt=PROMPTS[1],
        response="heat from the sun",
        source="t",
        options=("ice", "heat from the sun", "a magnet"),
        answer=1,
    ),
    TrainExample(
        prompt="Question: What do magnets attract?\nAnswer:",
        response="iron",
        source="t",
        options=("iron", "water", "light", "grams"),
        answer=0,
    ),
]


def test_option_objective_is_cross_entropy_over_options_plus_kl_to_the_sharer_alone(
    models: tuple[Any, Any],
) -> None:
    receiver, sharer = models
    fuser = _fuser(models).eval()  # hard gates: the same fused cache on every call
    pipe = pair.pipeline(receiver, sharer, fuser)
    fused = pipe.score([e.prompt for e in MC_EXAMPLES], [e.options for e in MC_EXAMPLES])
    alone = pair.pipeline(sharer).score([e.prompt for e in MC_EXAMPLES], [e.options for e in MC_EXAMPLES])
    ce, kl = [], []
    for e, f_row, s_row in zip(MC_EXAMPLES, fused, alone, strict=True):
        log_q = torch.log_softmax(torch.tensor(f_row), 0)
        p = torch.softmax(torch.tensor(s_row), 0)
        ce.append(float(-log_q[e.answer]))
        kl.append(float((p * (p.log() - log_q)).sum()))
    assert OptionObjective(pipe, 1.0, 0.0)(MC_EXAMPLES).item() == pytest.approx(sum(ce) / 2, abs=1e-4)
    assert OptionObjective(pipe, 0.0, 1.0)(MC_EXAMPLES).item() == pytest.approx(sum(kl) / 2, abs=1e-4)
    both = OptionObjective(pipe, 0.5, 2.0)(MC_EXAMPLES)
    assert both.item() == pytest.approx((0.5 * sum(ce) + 2.0 * sum(kl)) / 2, abs=1e-4)
    fuser.train()
    both = OptionObjective(pipe, 0.5, 2.0)(MC_EXAMPLES)
    both.backward()  # type: ignore[no-untyped-call]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fuser.parameters())
    assert all(p.grad is None for p in receiver.model.parameters())
    with pytest.raises(ConfigError, match="sharer"):
        OptionObjective(pair.pipeline(receiver), 0.0, 1.0)
    with pytest.raises(ConfigError, match="mc_weight"):
        TrainConfig(mc_weight=-1.0)


def test_training_with_option_terms_lowers_the_loss(models: tuple[Any, Any]) -> None:
    receiver, sharer = models
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=16)
    info = train_fuser(
        pair.pipeline(receiver, sharer, fuser),
        MC_EXAMPLES + EXAMPLES,
        TrainConfig(steps=20, batch_size=5, lr=1e-2, warmup_fraction=0.1, mc_weight=1.0, distill_weight=0.5),
        progress=False,
    )
    assert info["final_loss"] < info["first_loss"] and info["skipped_steps"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_attention_gives_finite_gradients_for_left_padded_rows(device: str) -> None:
    """A left-padded query row attends to nothing (log-sum-exp −inf). Under `attention_for_training` the
    attention's gradients stay finite there — on CUDA too, where cuDNN's SDPA backward returns NaN for
    such rows at some widths (pytorch/pytorch#196678: width % 128 == 64, an explicit mask)."""
    from cachelm.c2c.train import attention_for_training

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    width, pad, dim = 192, 5, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, width, dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3)
    )
    mask = torch.ones(width, width, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :pad] = False  # row 1 is left-padded: its first `pad` queries attend to nothing
    with attention_for_training(torch.device(device)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(device))
    # The loss reads real positions only, as training's does.
    real = torch.ones(2, 1, width, 1, device=device, dtype=dtype)
    real[1, :, :pad] = 0
    (out * real).float().square().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()), name
    assert float(q.grad[0].abs().sum()) > 0  # gradients reached the queries
