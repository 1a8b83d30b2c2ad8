"""C2C data loading: ARC and OpenBookQA files in their published formats, both prompt styles, and the
guarantee that training never reads a test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachelm.c2c.data import format_prompt, load_test, load_training
from cachelm.errors import ConfigError


def _arc_row(qid: str, stem: str, answer: str) -> dict[str, object]:
    choices = [{"label": lab, "text": f"{stem} option {lab}"} for lab in "ABCD"]
    return {"id": qid, "question": {"stem": stem, "choices": choices}, "answerKey": answer}


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("Easy", "Challenge"):
        for split in ("Train", "Test"):
            _write(
                tmp_path / "arc" / f"ARC-{name}" / f"ARC-{name}-{split}.jsonl",
                [_arc_row(f"{name}-{split}-{i}", f"{name} {split} q{i}?", "BCDA"[i]) for i in range(4)],
            )
    for split in ("train", "test"):
        rows: list[dict[str, object]] = [
            {"id": f"ob-{split}-{i}", "sent1": f"OBQA {split} q{i}", "label": i % 4}
            | {f"ending{k}": f"end{k}" for k in range(4)}
            for i in range(3)
        ]
        _write(tmp_path / "openbookqa" / f"{split}.json", rows)
    return tmp_path


def test_plain_prompt_shows_only_the_question(data: Path) -> None:
    q = load_test(data, "arc_easy")[1]
    assert q.prompt == "Question: Easy Test q1?\nAnswer:"
    assert q.options[q.answer] == "Easy Test q1? option C"


def test_options_prompt_lists_every_option_in_order(data: Path) -> None:
    q = load_test(data, "openbookqa", "options")[2]
    assert q.prompt == "Question: OBQA test q2\nA. end0\nB. end1\nC. end2\nD. end3\nAnswer:"
    assert q.answer == 2 and q.options == ("end0", "end1", "end2", "end3")
    # The plain question is the same question: only the prompt differs.
    plain = load_test(data, "openbookqa")[2]
    assert (plain.id, plain.options, plain.answer) == (q.id, q.options, q.answer)


@pytest.mark.parametrize("style", ["plain", "options"])
def test_training_reads_train_splits_only_and_keeps_the_style(data: Path, style: str) -> None:
    examples = load_training(data, instructions=0, prompt_style=style)
    assert len(examples) == 4 + 4 + 3
    assert not any("Test" in e.prompt or "test" in e.prompt for e in examples)
    for e in examples:
        assert e.answer is not None and e.response == e.options[e.answer]
        assert ("\nA. " in e.prompt) == (style == "options")


def test_bad_prompt_style_and_too_many_options_are_clear_errors(data: Path) -> None:
    with pytest.raises(ConfigError, match="prompt_style"):
        load_test(data, "arc_easy", "letters")
    with pytest.raises(ConfigError, match="26 options"):
        format_prompt("q", tuple(str(i) for i in range(27)))
