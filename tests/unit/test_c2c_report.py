"""The statistics behind the C2C reports (`benchmarks/c2c_eval.py`, `benchmarks/c2c_ceiling.py`): paired
gaps, their intervals, the mean over recipes, the recipe table's choice and training lines, and the
score mixes of the ceiling."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.scripts import load_benchmark


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return load_benchmark("c2c_eval")


ANSWERS = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def _run(c2c: list[int], control: list[int]) -> dict[str, Any]:
    def acc(pred: list[int]) -> dict[str, Any]:
        return {
            "acc": sum(p == y for p, y in zip(pred, ANSWERS, strict=True)) / len(ANSWERS),
            "predictions": pred,
        }

    return {"c2c": {"arc_easy": acc(c2c)}, "control": {"arc_easy": acc(control)}}


def test_paired_bootstrap_gives_the_gap_and_an_interval_around_it(report: ModuleType) -> None:
    c2c = [*ANSWERS[:7], 9, 9, 9]  # 7 right
    control = ANSWERS[:5] + [9] * 5  # 5 right, each also right for C2C
    gap, lo, hi = report.paired_bootstrap(c2c, control, ANSWERS)
    assert gap == pytest.approx(20.0)
    assert 0.0 <= lo <= gap <= hi <= 100.0  # per question the difference is 0 or +1, never −1
    assert hi > lo
    assert report.paired_bootstrap(c2c, c2c, ANSWERS) == (0.0, 0.0, 0.0)


def test_mean_gap_averages_recipes_per_question(report: ModuleType) -> None:
    right, wrong = list(ANSWERS), [9] * 10
    one = _run(right[:6] + wrong[6:], right[:4] + wrong[4:])  # +20 points
    two = _run(right[:4] + wrong[4:], right[:4] + wrong[4:])  # 0 points
    cell = report._mean_gap([one, two, {}], "arc_easy", {"arc_easy": ANSWERS})
    assert cell.startswith("+10.0 (n = 2) [")  # the run without the set is left out
    lo, hi = (float(x) for x in cell.split("[")[1].rstrip("]").split(", "))
    assert 0.0 <= lo < 10.0 < hi <= 50.0  # per question the mean is 0 or +0.5
    assert report._mean_gap([one], "arc_easy", {}) == "+20.0 (n = 1)"  # no answers: no interval
    assert report._mean_gap([{}], "arc_easy", {"arc_easy": ANSWERS}) == "—"


def test_recipe_table_marks_the_dev_choice_and_how_a_resumed_run_was_timed(report: ModuleType) -> None:
    right, wrong = list(ANSWERS), [9] * 10
    train = {"steps": 420, "seconds": 215.0, "first_loss": 9.0, "final_loss": 7.0}
    results = {
        "chosen_recipe": "a",
        "recipes": {
            "a": {
                "recipe": "first",
                "dev_accuracy": _run(right[:6] + wrong[6:], right[:5] + wrong[5:]),
                "accuracy": _run(right[:6] + wrong[6:], right[:6] + wrong[6:]),
                "train": {"c2c": dict(train), "control": dict(train, resumed_at_step=300)},
            },
            "b": {
                "recipe": "second",
                "dev_accuracy": _run(right[:5] + wrong[5:], right[:5] + wrong[5:]),
                "accuracy": _run(right[:8] + wrong[8:], right[:6] + wrong[6:]),
                "train": {"c2c": dict(train, seconds_from_step=400), "control": dict(train)},
            },
        },
    }
    table = report.recipes_report(results, {"arc_easy": ANSWERS})
    rows = {line.split(":")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| **a** (chosen)" in rows and "**+10.0**" in rows["| **a** (chosen)"]
    assert "| b" in rows and "50.0 / 50.0 / **+0.0**" in rows["| b"]
    mean_row = next(line for line in table.splitlines() if line.startswith("| mean Δ over the 2 recipes"))
    assert "+5.0 (n = 2)" in mean_row and "+10.0 (n = 2) [" in mean_row  # dev, then ARC-Easy test
    assert "seeds" not in table  # neither "base" nor a "seedN" rerun: no seed row
    assert "control 420 steps, 215 s (resumed at step 300)" in table
    a, b = results["recipes"]["a"], results["recipes"]["b"]
    results["recipes"] = {"base": a, "seed2": b, "c": a}
    seed_row = next(
        line for line in report.recipes_report(results, {"arc_easy": ANSWERS}).splitlines() if "seeds" in line
    )
    assert seed_row.startswith("| mean Δ over the committed recipe's 2 seeds (base, seed2) | +5.0 (n = 2) |")
    assert "c2c 420 steps, 215 s for steps 400–420 (resumed; earlier time not kept)" in table


def test_labels_name_the_pair_in_either_direction(report: ModuleType) -> None:
    assert report.model_key("/root/models/smollm2-135m-instruct-q4_1.gguf") == "smollm2"
    assert report.model_key("gemma3") == report.model_key("/m/gemma-3-270m-q4_k_m.gguf") == "gemma3"
    assert report.model_key("/root/models/hf/receiver") is None
    first = report.labels({})  # results written before the names were recorded: the first pair
    assert (
        first["receiver"] == "receiver alone (SmolLM2-135M)"
        and first["c2c"] == "C2C (receiver ← Gemma-3 cache)"
    )
    reverse = report.labels({"receiver_model": "gemma3", "sharer_model": "smollm2"})
    assert reverse["receiver"] == "receiver alone (Gemma-3-270M)"
    assert (
        reverse["sharer"] == "sharer alone (SmolLM2-135M)"
        and reverse["c2c"] == "C2C (receiver ← SmolLM2 cache)"
    )
    assert (
        report.labels({"receiver_model": "other", "sharer_model": "x"})["receiver"]
        == "receiver alone (other)"
    )


def test_merge_folds_variant_runs_in_and_chooses_on_dev(report: ModuleType, tmp_path: Path) -> None:
    import json

    right, wrong = list(ANSWERS), [9] * 10
    train = {"steps": 420, "seconds": 215.0, "first_loss": 9.0, "final_loss": 7.0}
    runs = {
        "base": _run(right[:6] + wrong[6:], right[:5] + wrong[5:]),  # dev +10
        "wide": _run(right[:8] + wrong[8:], right[:5] + wrong[5:]),  # dev +30
    }
    for name, dev in runs.items():
        (tmp_path / name).mkdir()
        run = {"dev_accuracy": dev, "accuracy": dev, "train": {"c2c": dict(train, seconds=300.0)}}
        (tmp_path / name / "results.json").write_text(json.dumps(run))
    (tmp_path / "wide" / "recipe.txt").write_text("--steps 420 --hidden 256\n")
    (tmp_path / "unfinished").mkdir()  # trained, not evaluated: left out
    (tmp_path / "unfinished" / "results.json").write_text(json.dumps({"train": {}}))
    results = {
        "recipes": {
            "base": {
                "recipe": "the committed pair",
                "note": "kept",
                "dev_accuracy": {},
                "accuracy": {},
                "train": {"c2c": dict(train, seconds_from_step=400)},
            }
        },
        "chosen_recipe": "base",
    }
    assert report.merge_recipes(results, tmp_path) == ["base", "wide"]
    base, wide = results["recipes"]["base"], results["recipes"]["wide"]
    assert base["recipe"] == "the committed pair" and base["note"] == "kept"
    assert base["train"]["c2c"]["seconds"] == 300.0 and base["train"]["c2c"]["seconds_from_step"] == 400
    assert base["dev_accuracy"] == runs["base"]
    assert wide["recipe"] == "420 steps, fuser width 256" and "note" not in wide
    assert results["chosen_recipe"] == "wide"


def test_recipe_flags_are_described_in_words(report: ModuleType) -> None:
    assert (
        report.describe_recipe("--steps 420 --distill-weight 1 --fuse-span all --seed 2\n")
        == "420 steps, KL weight 1, every position fused, seed 2"
    )
    assert report.describe_recipe("--instructions 0 --new-flag 3 --flag") == (
        "0 instructions, --new-flag 3, --flag"
    )
    assert report.describe_recipe("--token-alignment mean --sharer-positions own") == (
        "mean token alignment, sharer keeps its own positions"
    )


def test_fold_training_gathers_each_fusers_summary_without_losing_the_evaluation(
    report: ModuleType, tmp_path: Path
) -> None:
    import json

    for m, seconds in (("c2c", 300.0), ("control", 120.0)):
        (tmp_path / f"train-{m}").mkdir()
        summary = {"train": {m: {"steps": 420, "seconds": seconds}}, "meta": {"command": m}}
        (tmp_path / f"train-{m}" / "results.json").write_text(json.dumps(summary))
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": {"c2c": {"arc_easy": {"acc": 0.6}}}}))
    folded = report.fold_training(tmp_path)
    assert folded["train"] == {
        "c2c": {"steps": 420, "seconds": 300.0},
        "control": {"steps": 420, "seconds": 120.0},
    }
    assert folded["accuracy"]["c2c"]["arc_easy"]["acc"] == 0.6  # the evaluation is kept
    assert json.loads((tmp_path / "results.json").read_text()) == folded
    # A run that only trained (no evaluation yet) gets its results file from the summaries alone.
    (tmp_path / "results.json").unlink()
    assert set(report.fold_training(tmp_path)) == {"train"}


@pytest.fixture(scope="module")
def ceiling() -> ModuleType:
    return load_benchmark("c2c_ceiling")


def test_score_mix_picks_the_dev_weight_and_applies_it_to_test(ceiling: ModuleType) -> None:
    # Question 1: `a` prefers option 0 by 1.0, `b` prefers option 1 by 4.0; the right answer is 1.
    a, b = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 4.0], [0.0, 1.0]]
    assert ceiling.mix(a, b, 0.0) == [0, 1]
    assert ceiling.mix(a, b, 0.5) == [1, 1]  # 1.0 + 0 < 0 + 0.5·4
    assert ceiling.best_weight(a, b, [1, 1]) == 0.3  # the smallest grid weight past the tie (w = 0.25)
    assert ceiling.best_weight(a, b, [0, 1]) == 0.0  # mixing only hurts: w stays 0

    scores = {"receiver": a, "sharer": b, "control": a, "c2c": b}
    data = {
        "device": "cpu",
        "seconds": 1.0,
        "scores": {"Dev": scores, "Test": scores},
        "answers": {"Dev": [1, 1], "Test": [1, 1]},
    }
    rows = {line.split(" | ")[0]: line for line in ceiling.report(data).splitlines() if line.startswith("| ")}
    assert rows["| control + w·sharer"].startswith("| control + w·sharer | 0.30 | 100.0 | 100.0 | +50.0 [")
    assert rows["| control"] == "| control | — | 50.0 | 50.0 | — |"


def test_confidence_weighted_fusion_learns_to_trust_the_sharer_where_the_receiver_is_unsure(
    ceiling: ModuleType,
) -> None:
    # Option 0 is always right. `a` is sure and right on even questions, unsure and wrong on odd ones;
    # `b` is right on odd questions and strongly wrong on even ones. Each alone is right half the time.
    a = [[4.0, 0.0, 0.0] if i % 2 == 0 else [0.0, 0.2, 0.0] for i in range(40)]
    b = [[0.0, 6.0, 0.0] if i % 2 == 0 else [1.5, 0.0, 0.0] for i in range(40)]
    y = [0] * 40
    assert ceiling.accuracy(ceiling._pick(a), y) == ceiling.accuracy(ceiling._pick(b), y) == 50.0
    dev_pred, test_pred = ceiling.stack(a, b, y, a[:10], b[:10])
    assert ceiling.accuracy(dev_pred, y) == 100.0 and test_pred == [0] * 10


def test_save_copy_keeps_a_reloadable_copy_named_after_the_model(report: ModuleType, tmp_path: Path) -> None:
    from cachelm.c2c import pair
    from tests.unit.test_c2c_support import sharer_model, sharer_tokenizer

    source = tmp_path / "gemma-3-tiny"  # the folder's name tells which packaged model it stands for
    sharer_model().save_pretrained(source)
    sharer_tokenizer().save_pretrained(source)
    copy = report.save_copy(str(source), tmp_path / "hf", "cpu")
    assert copy == tmp_path / "hf" / "gemma3"
    assert pair.load(copy).fingerprint == pair.load(source).fingerprint
    stamp = (copy / "config.json").stat().st_mtime_ns
    assert report.save_copy(str(source), tmp_path / "hf", "cpu") == copy  # kept, not written again
    assert (copy / "config.json").stat().st_mtime_ns == stamp


def test_a_copy_of_a_file_loaded_model_keeps_the_file_hash(report: ModuleType, tmp_path: Path) -> None:
    from cachelm.c2c import pair
    from tests.unit.test_c2c_support import sharer_model, sharer_tokenizer

    weights = tmp_path / "gemma-3-tiny.gguf"  # stands for the GGUF file the model was loaded from
    weights.write_bytes(b"quantised weights")
    loaded = pair.from_objects(str(weights), sharer_model(), sharer_tokenizer(), source_file=weights)
    assert len(loaded.file_sha256) == 64
    copy = report.save_copy(str(weights), tmp_path / "hf", "cpu", loaded=loaded)
    assert pair.load(copy).file_sha256 == loaded.file_sha256
    folder_only = tmp_path / "plain"
    sharer_model().save_pretrained(folder_only)
    sharer_tokenizer().save_pretrained(folder_only)
    assert pair.load(folder_only).file_sha256 == ""  # no record: the hash stays unknown, never guessed
