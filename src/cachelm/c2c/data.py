"""Training and evaluation data for C2C: ARC (Easy, Challenge), OpenBookQA, Alpaca instructions.

Every example is a prompt in one format, so training and evaluation read the same text. The "plain" style
(the default) shows the question only::

    Question: <question>
    Answer:

The "options" style lists the options in the prompt too, so a model that reads the prompt (the sharer, in
C2C) has seen every option before the receiver scores them::

    Question: <question>
    A. <option 1>
    B. <option 2>
    Answer:

In both, the response / each option is read as " <text>" (option log-likelihood, never the letter).
Training uses the *train* splits of ARC and OpenBookQA plus Alpaca; evaluation uses the *test* splits
only (`load_test`), and nothing here reads a test split for training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cachelm.errors import ConfigError

TestSet = Literal["arc_easy", "arc_challenge", "openbookqa"]
TEST_SETS: tuple[str, ...] = get_args(TestSet)
PromptStyle = Literal["plain", "options"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)


@dataclass(frozen=True, kw_only=True)
class MCQuestion:
    """One multiple-choice question: the prompt, its options and the index of the right one."""

    id: str
    prompt: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True, kw_only=True)
class TrainExample:
    """A prompt and the response the receiver should produce after it; a multiple-choice example also
    carries its options and the index of the right one (`response` is that option)."""

    prompt: str
    response: str
    source: str
    options: tuple[str, ...] = ()
    answer: int | None = None


def format_prompt(question: str, options: tuple[str, ...] = ()) -> str:
    """The prompt used for training and evaluation; with `options`, they are listed as "A. …" lines."""
    if len(options) > 26:
        raise ConfigError(f"at most 26 options can be lettered, got {len(options)}")
    listed = "".join(f"\n{chr(65 + i)}. {o.strip()}" for i, o in enumerate(options))
    return f"Question: {question.strip()}{listed}\nAnswer:"


def _check_style(prompt_style: str) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"`prompt_style` must be one of {list(PROMPT_STYLES)}, got {prompt_style!r}")


def _question(*, id: str, stem: str, options: tuple[str, ...], answer: int, prompt_style: str) -> MCQuestion:
    shown = options if prompt_style == "options" else ()
    return MCQuestion(id=id, prompt=format_prompt(stem, shown), options=options, answer=answer)


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} not found (is `--data` the shared data folder?)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _arc(path: Path, prompt_style: str) -> list[MCQuestion]:
    out = []
    for row in _read_jsonl(path):
        q = row["question"]
        assert isinstance(q, dict)
        labels = [c["label"] for c in q["choices"]]
        out.append(
            _question(
                id=str(row["id"]),
                stem=str(q["stem"]),
                options=tuple(str(c["text"]) for c in q["choices"]),
                answer=labels.index(row["answerKey"]),
                prompt_style=prompt_style,
            )
        )
    return out


def _obqa(path: Path, prompt_style: str) -> list[MCQuestion]:
    return [
        _question(
            id=str(row["id"]),
            stem=str(row["sent1"]),
            options=tuple(str(row[f"ending{i}"]) for i in range(4)),
            answer=int(str(row["label"])),
            prompt_style=prompt_style,
        )
        for row in _read_jsonl(path)
    ]


Split = Literal["Train", "Dev", "Test"]


def _split_file(data: Path, name: str, split: Split) -> Path:
    if name == "arc_easy":
        return data / "arc" / "ARC-Easy" / f"ARC-Easy-{split}.jsonl"
    if name == "arc_challenge":
        return data / "arc" / "ARC-Challenge" / f"ARC-Challenge-{split}.jsonl"
    if name == "openbookqa":
        return data / "openbookqa" / f"{split.lower()}.json"
    raise ConfigError(f"`name` must be one of {list(TEST_SETS)}, got {name!r}")


def load_questions(
    data: str | Path, name: str, split: Split, prompt_style: str = "plain"
) -> list[MCQuestion]:
    """The questions of one split of one multiple-choice set, prompted in `prompt_style`."""
    _check_style(prompt_style)
    if split not in get_args(Split):
        raise ConfigError(f"`split` must be one of {list(get_args(Split))}, got {split!r}")
    path = _split_file(Path(data), name, split)
    return _obqa(path, prompt_style) if name == "openbookqa" else _arc(path, prompt_style)


def load_test(data: str | Path, name: str, prompt_style: str = "plain") -> list[MCQuestion]:
    """The TEST split of `name` (arc_easy, arc_challenge, openbookqa): evaluation only."""
    return load_questions(data, name, "Test", prompt_style)


def load_training(
    data: str | Path,
    *,
    instructions: int = 5000,
    seed: int = 0,
    max_response_chars: int = 400,
    prompt_style: str = "plain",
) -> list[TrainExample]:
    """Train splits of ARC-Easy, ARC-Challenge and OpenBookQA (prompt → right option) plus up to
    `instructions` Alpaca examples (responses cut at `max_response_chars`), shuffled with `seed`.
    `prompt_style` applies to the multiple-choice examples; Alpaca prompts have no options."""
    root = Path(data)
    out: list[TrainExample] = []
    for name in TEST_SETS:
        for q in load_questions(root, name, "Train", prompt_style):
            out.append(
                TrainExample(
                    prompt=q.prompt,
                    response=q.options[q.answer],
                    source=name,
                    options=q.options,
                    answer=q.answer,
                )
            )
    alpaca_path = root / "instruct" / "alpaca_5000.json"
    if instructions > 0:
        if not alpaca_path.is_file():
            raise ConfigError(f"data file {str(alpaca_path)!r} not found")
        rows = json.loads(alpaca_path.read_text(encoding="utf-8"))[:instructions]
        for row in rows:
            question = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
            response = str(row["output"]).strip()[:max_response_chars]
            if response:
                out.append(TrainExample(prompt=format_prompt(question), response=response, source="alpaca"))
    random.Random(seed).shuffle(out)
    return out
