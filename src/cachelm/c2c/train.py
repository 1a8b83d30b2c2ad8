"""Training a fuser: both models frozen, next-token loss on the receiver's response tokens only.

AdamW with linear warm-up and cosine decay; the gates' Gumbel temperature anneals geometrically from
`tau_start` to `tau_end`, so late training sees nearly hard gates, as inference does. The run is resumable:
every `save_every` steps (and at the end) the fuser, optimiser, scheduler and step go to `state_path`, and a
restart with the same arguments continues from there with the same batch order.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cachelm.c2c.data import TrainExample
from cachelm.c2c.runtime import C2CPipeline
from cachelm.errors import ConfigError, TrainingError


@contextlib.contextmanager
def attention_for_training(device: torch.device) -> Iterator[None]:
    """Scaled-dot-product attention without the cuDNN backend while gradients flow through the receiver.

    cuDNN's SDPA backward (PyTorch 2.11–2.13 on H100/H200, the default backend there) returns NaN query
    gradients when an explicit mask is passed and a query row's log-sum-exp falls below about −88.7
    (pytorch/pytorch#196678). A left-padded row attends to nothing, so its log-sum-exp is −inf: batched
    training with padding meets the bug, as the all-position fuser did (non-finite steps on an H100). The
    flash, memory-efficient and math kernels compute the same attention without it. Elsewhere (CPU) the
    backends are left as they are.
    """
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings; `steps` wins over `epochs` when given."""

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    tau_start: float = 1.0
    tau_end: float = 0.05
    max_response_tokens: int = 48
    max_prompt_chars: int = 1000
    grad_clip: float = 1.0
    max_skipped_fraction: float = 0.02
    mc_weight: float = 0.0
    distill_weight: float = 0.0
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.lr <= 0 or self.epochs <= 0:
            raise ConfigError(
                f"`batch_size`, `lr` and `epochs` must be positive, got {self.batch_size!r}, {self.lr!r}, "
                f"{self.epochs!r}"
            )
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"`steps` must be ≥ 1, got {self.steps!r}")
        if self.mc_weight < 0 or self.distill_weight < 0:
            raise ConfigError(
                "`mc_weight` and `distill_weight` must be ≥ 0, "
                f"got {self.mc_weight!r}, {self.distill_weight!r}"
            )
        if not 0 <= self.max_skipped_fraction < 1:
            raise ConfigError(f"`max_skipped_fraction` must be in [0, 1), got {self.max_skipped_fraction!r}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"need 0 < `tau_end` ≤ `tau_start`, got {self.tau_end!r}, {self.tau_start!r}")

    def total_steps(self, num_examples: int) -> int:
        """Optimiser steps for a data set of `num_examples`."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up to 1 over the first `warmup_fraction` of `total`, then cosine decay to 0."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def temperature(step: int, total: int, tau_start: float, tau_end: float) -> float:
    """Geometric annealing of the gate temperature from `tau_start` (step 0) to `tau_end` (last step)."""
    return float(tau_start * (tau_end / tau_start) ** (step / max(1, total - 1)))


def _batches(n: int, batch_size: int, total: int, seed: int) -> list[list[int]]:
    """Index batches for `total` steps: one seeded permutation per epoch, concatenated."""
    order: list[int] = []
    epoch = 0
    while len(order) < total * batch_size:
        perm = list(range(n))
        random.Random(seed + epoch).shuffle(perm)
        order += perm
        epoch += 1
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(total)]


class OptionObjective:
    """The option-level terms of the loss, on the multiple-choice examples of a batch.

    For a question with options o_1..o_n, let s_j be the fused receiver's summed log-probability of
    " o_j" after the prompt (what evaluation scores) and q = softmax(s). Then

    * `mc_weight` · −log q_answer — cross-entropy over the options: it trains the discrimination the
      evaluation measures, where the response loss only raises the right option's likelihood;
    * `distill_weight` · KL(p ‖ q), with p the softmax of the *sharer alone*'s option log-probabilities —
      distillation of the sharer's judgment, which the receiver can only match by reading it out of the
      fused cache. For the fair control the sharer is the receiver itself, so p is the receiver's own
      judgment and the term carries no outside knowledge: the control stays fair.

    The sharer's p are computed once per question (the sharer is frozen) and cached.
    """

    def __init__(self, pipeline: C2CPipeline, mc_weight: float, distill_weight: float) -> None:
        self.pipeline = pipeline
        self.mc_weight = mc_weight
        self.distill_weight = distill_weight
        self._teacher_cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self._teacher: C2CPipeline | None = None
        if distill_weight > 0:
            if pipeline.sharer is None or pipeline.sharer_tokenizer is None:
                raise ConfigError("`distill_weight` needs a pipeline with a sharer")
            self._teacher = C2CPipeline(pipeline.sharer, pipeline.sharer_tokenizer)

    def teacher(self, examples: Sequence[TrainExample]) -> list[torch.Tensor]:
        """The sharer-alone option distribution p of each example (float32, on the pipeline's device)."""
        assert self._teacher is not None
        missing = [e for e in examples if (e.prompt, e.options) not in self._teacher_cache]
        if missing:
            scores = self._teacher.score([e.prompt for e in missing], [e.options for e in missing])
            for e, row in zip(missing, scores, strict=True):
                probs = torch.softmax(torch.tensor(row, dtype=torch.float32), 0)
                self._teacher_cache[(e.prompt, e.options)] = probs.to(self.pipeline.device)
        return [self._teacher_cache[(e.prompt, e.options)] for e in examples]

    def __call__(self, examples: Sequence[TrainExample], flat: torch.Tensor | None = None) -> torch.Tensor:
        """The option terms averaged over `examples` (each must have options and an answer).

        `flat`: the fused receiver's option log-probabilities, every option of every example in order, when
        the caller already has them (training scores them on the same prefill as the responses)."""
        if flat is None:
            flat = self.pipeline.option_logprobs([e.prompt for e in examples], [e.options for e in examples])
        targets = self.teacher(examples) if self.distill_weight > 0 else [None] * len(examples)
        total = flat.new_zeros(())
        k = 0
        for e, p in zip(examples, targets, strict=True):
            assert e.answer is not None
            log_q = torch.log_softmax(flat[k : k + len(e.options)], 0)  # (n,)
            k += len(e.options)
            if self.mc_weight > 0:
                total = total - self.mc_weight * log_q[e.answer]
            if p is not None:
                total = total + self.distill_weight * (p * (p.clamp_min(1e-12).log() - log_q)).sum()
        return total / len(examples)


def train_fuser(
    pipeline: C2CPipeline,
    examples: Sequence[TrainExample],
    config: TrainConfig,
    *,
    state_path: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train `pipeline.fuser` in place on `examples`; return a summary (steps, losses, seconds).

    With `state_path`, the state is saved every `config.save_every` steps and a run finds it and goes
    on from there; the summary's `seconds` then adds the time of the saved steps (work after the last
    save is lost and not counted) and `resumed_at_step` says where it went on.

    Only the fuser's parameters are optimised; the receiver and sharer must not require gradients.

    A step whose loss or gradient norm is not finite is skipped (no update; AMP's loss scaler does the
    same): one NaN would otherwise reach every parameter through AdamW and end the run. Skipped steps are
    counted in the summary with the first one's batch; more than `max_skipped_fraction` of the steps
    raises `TrainingError`, since then the run itself is unsound.
    """
    fuser = pipeline.fuser
    if fuser is None:
        raise ConfigError("`pipeline` has no fuser to train")
    frozen = [pipeline.receiver] + ([pipeline.sharer] if pipeline.sharer is not None else [])
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        raise ConfigError("the receiver and sharer must be frozen (`requires_grad_(False)`) before training")
    tok = pipeline.receiver_tokenizer
    data = [e for e in examples if len(e.prompt) <= config.max_prompt_chars]
    responses = [
        tok(" " + e.response, add_special_tokens=False)["input_ids"][: config.max_response_tokens]
        for e in data
    ]
    keep = [i for i, r in enumerate(responses) if r]
    if not keep:
        raise ConfigError("`examples` has no usable example (empty responses or prompts too long)")
    total = config.total_steps(len(keep))
    batches = _batches(len(keep), config.batch_size, total, config.seed)
    options = None
    if config.mc_weight > 0 or config.distill_weight > 0:
        options = OptionObjective(pipeline, config.mc_weight, config.distill_weight)

    optimizer = torch.optim.AdamW(fuser.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, config.warmup_fraction)
    )
    step, losses = 0, []
    skipped: list[dict[str, Any]] = []
    # Training time of the steps a resumed run inherits, so the summary's `seconds` is the whole run's.
    earlier_seconds, resumed_at = 0.0, None
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file():
        # On the CPU: the RNG states must stay CPU byte tensors, and `load_state_dict` below moves the
        # fuser's and the optimiser's tensors to their parameters' device.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["config"] != asdict(config) or state["total"] != total:
            raise ConfigError(f"`state_path` {str(path)!r} belongs to a run with different settings")
        fuser.load_state_dict(state["fuser"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        skipped = list(state.get("skipped", []))
        earlier_seconds, resumed_at = float(state.get("seconds", 0.0)), step
        # The gates' Gumbel noise comes from torch's global generators: restore them so a resumed run
        # draws the same noise as an uninterrupted one.
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save() -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(
            {
                "config": asdict(config),
                "total": total,
                "step": step,
                "losses": losses,
                "skipped": skipped,
                "seconds": earlier_seconds + time.perf_counter() - started,
                "fuser": fuser.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            tmp,
        )
        tmp.replace(path)

    from tqdm import tqdm

    fuser.train()
    started = time.perf_counter()
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train fuser", mininterval=5.0)
    while step < total:
        idx = [keep[i] for i in batches[step]]
        fuser.temperature = temperature(step, total, config.tau_start, config.tau_end)
        # The responses and the options of the batch's multiple-choice examples read one fused prefill.
        rows, suffixes = list(range(len(idx))), [responses[i] for i in idx]
        mc_pos = (
            [k for k, i in enumerate(idx) if data[i].options and data[i].answer is not None]
            if options is not None
            else []
        )
        mc = [data[idx[k]] for k in mc_pos]
        if mc:
            option_rows, option_suffixes = pipeline.option_suffixes([e.options for e in mc])
            rows += [mc_pos[r] for r in option_rows]
            suffixes += option_suffixes
        # The backward pass reuses the kernels the forward pass chose: only the forward needs the guard.
        with attention_for_training(pipeline.device):
            logp, mask = pipeline.token_logprobs([data[i].prompt for i in idx], rows, suffixes)
            loss = -logp[: len(idx)].sum() / mask[: len(idx)].sum()
            if options is not None and mc:
                loss = loss + options(mc, logp[len(idx) :].sum(-1))
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        norm = float("nan")
        if math.isfinite(value):
            loss.backward()  # type: ignore[no-untyped-call]
            norm = float(torch.nn.utils.clip_grad_norm_(fuser.parameters(), config.grad_clip))
        if math.isfinite(norm):
            optimizer.step()
            losses.append(value)
        else:
            optimizer.zero_grad(set_to_none=True)
            skipped.append({"step": step, "loss": value, "grad_norm": norm, "examples": idx})
            if len(skipped) > config.max_skipped_fraction * total:
                raise TrainingError(
                    f"{len(skipped)} of {step + 1} steps had a non-finite loss or gradient; the first: "
                    f"step {skipped[0]['step']}, loss {skipped[0]['loss']}, examples {skipped[0]['examples']}"
                )
        scheduler.step()
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}", tau=f"{fuser.temperature:.2f}")
        if on_step is not None:
            on_step(step, value)
        if step % config.save_every == 0:
            save()
    bar.close()
    save()
    fuser.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": total,
        "examples": len(keep),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "seconds": earlier_seconds + time.perf_counter() - started,
        "resumed_at_step": resumed_at,
        "open_gates": int((fuser.gate_logits > 0).sum()),
        "skipped_steps": len(skipped),
        "first_skipped": skipped[0] if skipped else None,
        "loss_curve": [sum(losses[i : i + 20]) / len(losses[i : i + 20]) for i in range(0, len(losses), 20)],
        "config": asdict(config),
    }
