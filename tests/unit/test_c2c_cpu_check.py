"""benchmarks/c2c_cpu_check.py compares CPU answers with the H100's question by question, on the same
questions only (the numbers themselves live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from tests.scripts import load_benchmark


def _entry(predictions: list[int]) -> dict[str, list[int]]:
    return {"predictions": predictions}


def test_compare_counts_agreement_and_accuracy_on_the_same_questions() -> None:
    bench = load_benchmark("c2c_cpu_check")
    answers = {s: [0, 1, 2, 3, 0, 0] for s in bench.SETS}
    cpu = {m: {s: _entry([0, 1, 2, 0]) for s in bench.SETS} for m in ("c2c", "control")}
    # the H100 answered every question; only its first four answers are compared
    gpu = {m: {s: _entry([0, 1, 1, 3, 9, 9]) for s in bench.SETS} for m in ("c2c", "control")}
    rows = bench.compare(cpu, gpu, answers)
    assert len(rows) == 6 and {r["n"] for r in rows} == {4}
    row = rows[0]
    assert row["method"] == "c2c" and row["set"] == "arc_easy"
    assert row["cpu_acc"] == pytest.approx(3 / 4)  # right on 0, 1, 2
    assert row["gpu_acc"] == pytest.approx(3 / 4)  # right on 0, 1, 3
    assert row["agree"] == pytest.approx(2 / 4)  # same option on 0 and 1
    text = bench.render(
        {"machine": "m", "command": "c", "limit": 4, "directions": {"A ← B": rows}, "seconds": 1.0}
    )
    assert "| A ← B | c2c | ARC-Easy | 4 | 75.0 | 75.0 | 50.0 % |" in text
    assert "agree on 50.0 %" in text and "0.0 points" in text
