"""Evaluation of C2C against its baselines on multiple-choice test sets.

Scoring: **option log-likelihood** (zero-shot). Each option is read as " <option>" after the prompt
"Question: …\\nAnswer:" and the option with the highest summed log-probability wins ("acc"); "acc_norm"
divides by the option's length in characters. 95% intervals are Wilson score intervals.

Methods (all through `C2CPipeline`, so they share one code path):
  receiver   the receiver alone
  sharer     the sharer alone (its own tokenizer)
  t2t        text-to-text: the sharer writes a short hint (its greedy answer, first line), the receiver
             scores the options after "Question: …\\nHint: <hint>\\nAnswer:"
  control    the receiver with a fuser trained the same way with the receiver as its own sharer
  c2c        the receiver with the trained fuser and the sharer's cache

Latency per question: batch size 1, each method answers by greedy generation of exactly
`max_new_tokens`; time to first token (TTFT) and total, with a device synchronisation before each clock
read. For t2t the sharer's hint generation is part of both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cachelm.c2c.data import MCQuestion
from cachelm.c2c.runtime import C2CPipeline
from cachelm.errors import ConfigError

ANSWER_SUFFIX = "\nAnswer:"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n` (both ends in [0, 1])."""
    if n <= 0 or not 0 <= successes <= n:
        raise ConfigError(f"need 0 ≤ `successes` ≤ `n` and n > 0, got {successes!r}, {n!r}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, kw_only=True)
class ScoreResult:
    """Accuracy of one method on one test set."""

    n: int
    correct: int
    correct_norm: int
    predictions: tuple[int, ...]

    @property
    def acc(self) -> float:
        return self.correct / self.n

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n

    def as_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.correct, self.n)
        return {
            "n": self.n,
            "acc": self.acc,
            "acc_ci": [lo, hi],
            "acc_norm": self.acc_norm,
            "predictions": list(self.predictions),
        }


def hint_prompt(question: MCQuestion, hint: str) -> str:
    """The receiver's prompt in text-to-text mode: the question, the sharer's hint, then "Answer:"."""
    base = (
        question.prompt[: -len(ANSWER_SUFFIX)] if question.prompt.endswith(ANSWER_SUFFIX) else question.prompt
    )
    return f"{base}\nHint: {hint}{ANSWER_SUFFIX}"


def clean_hint(text: str, max_chars: int = 200) -> str:
    """First non-empty line of a generated hint, at most `max_chars`."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:max_chars]
    return ""


def score_questions(
    pipeline: C2CPipeline,
    questions: Sequence[MCQuestion],
    *,
    prompts: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "score",
) -> ScoreResult:
    """Option log-likelihood accuracy of `pipeline` on `questions` (prompts override the questions')."""
    from tqdm import tqdm

    if not questions:
        raise ConfigError("`questions` is empty")
    texts = list(prompts) if prompts is not None else [q.prompt for q in questions]
    preds, correct, correct_norm = [], 0, 0
    for start in tqdm(range(0, len(questions), batch_size), disable=not progress, desc=desc, mininterval=10):
        chunk = questions[start : start + batch_size]
        scores = pipeline.score(texts[start : start + batch_size], [q.options for q in chunk])
        for q, s in zip(chunk, scores, strict=True):
            best = max(range(len(s)), key=s.__getitem__)
            norm = [v / max(1, len(o)) for v, o in zip(s, q.options, strict=True)]
            best_norm = max(range(len(norm)), key=norm.__getitem__)
            preds.append(best)
            correct += int(best == q.answer)
            correct_norm += int(best_norm == q.answer)
    return ScoreResult(n=len(questions), correct=correct, correct_norm=correct_norm, predictions=tuple(preds))


def make_hints(
    sharer_alone: C2CPipeline,
    questions: Sequence[MCQuestion],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """The sharer's hints for `questions`: its greedy answer to each prompt, first line only."""
    from tqdm import tqdm

    hints: list[str] = []
    for start in tqdm(
        range(0, len(questions), batch_size), disable=not progress, desc="hints", mininterval=10
    ):
        chunk = questions[start : start + batch_size]
        hints += [clean_hint(t) for t in sharer_alone.generate([q.prompt for q in chunk], max_new_tokens)]
    return hints


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    answer: Callable[[MCQuestion], Iterator[Any]], questions: Sequence[MCQuestion], device: torch.device
) -> dict[str, float]:
    """Mean and median TTFT and total seconds of `answer` (a generator of tokens) over `questions`."""
    ttft, total = [], []
    for q in questions:
        _sync(device)
        t0 = time.perf_counter()
        first = None
        for _ in answer(q):
            if first is None:
                _sync(device)
                first = time.perf_counter() - t0
        _sync(device)
        total.append(time.perf_counter() - t0)
        ttft.append(first if first is not None else total[-1])
    ttft.sort()
    total.sort()
    return {
        "n": len(questions),
        "ttft_mean_s": sum(ttft) / len(ttft),
        "ttft_median_s": ttft[len(ttft) // 2],
        "total_mean_s": sum(total) / len(total),
        "total_median_s": total[len(total) // 2],
    }


def direct_answer(pipeline: C2CPipeline, max_new_tokens: int) -> Callable[[MCQuestion], Iterator[Any]]:
    """A latency probe: `pipeline` generates `max_new_tokens` for the question's prompt."""

    def run(q: MCQuestion) -> Iterator[Any]:
        yield from pipeline.generate_ids([q.prompt], max_new_tokens, stop_at_eos=False)

    return run


def t2t_answer(
    sharer_alone: C2CPipeline, receiver_alone: C2CPipeline, max_new_tokens: int, hint_tokens: int
) -> Callable[[MCQuestion], Iterator[Any]]:
    """A latency probe for text-to-text: the sharer's hint, then the receiver's generation."""

    def run(q: MCQuestion) -> Iterator[Any]:
        hint = clean_hint(sharer_alone.generate([q.prompt], hint_tokens)[0])
        yield from receiver_alone.generate_ids([hint_prompt(q, hint)], max_new_tokens, stop_at_eos=False)

    return run
