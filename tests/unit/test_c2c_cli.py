"""`cachelm c2c train|eval|generate` end to end on tiny models saved to disk and a tiny data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachelm.c2c.checkpoint import read_metadata
from cachelm.c2c.cli import main
from tests.unit.test_c2c_support import receiver_model, receiver_tokenizer, sharer_model, sharer_tokenizer


def _arc_row(i: int) -> dict[str, object]:
    return {
        "id": f"q{i}",
        "question": {
            "stem": f"Which gas do plants absorb number {i}?",
            "choices": [{"text": t, "label": lab} for t, lab in (("carbon dioxide", "A"), ("iron", "B"))],
        },
        "answerKey": "A",
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("c2c_cli")
    paths = {"receiver": root / "receiver", "sharer": root / "sharer", "data": root / "data"}
    for model, tok, key in (
        (receiver_model(), receiver_tokenizer(), "receiver"),
        (sharer_model(), sharer_tokenizer(), "sharer"),
    ):
        model.save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    data = paths["data"]
    for name in ("ARC-Easy", "ARC-Challenge"):
        (data / "arc" / name).mkdir(parents=True)
        for split in ("Train", "Test"):
            rows = "\n".join(json.dumps(_arc_row(i)) for i in range(3))
            (data / "arc" / name / f"{name}-{split}.jsonl").write_text(rows)
    (data / "openbookqa").mkdir()
    obqa = {
        "id": "o1",
        "sent1": "The sun is",
        "sent2": "",
        "ending0": "a star",
        "ending1": "a rock",
        "ending2": "ice",
        "ending3": "a café",
        "label": 0,
    }
    for split in ("train", "test"):
        (data / "openbookqa" / f"{split}.json").write_text(json.dumps(obqa))
    (data / "instruct").mkdir()
    (data / "instruct" / "alpaca_5000.json").write_text(
        json.dumps([{"instruction": "Name a fruit.", "input": "", "output": "A banana."}])
    )
    return paths


def _models(setup: dict[str, Path]) -> list[str]:
    return ["--receiver", str(setup["receiver"]), "--sharer", str(setup["sharer"])]


@pytest.mark.slow
def test_train_eval_generate(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "fuser.safetensors"
    args = [
        "--data",
        str(setup["data"]),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--hidden",
        "8",
        "--no-progress",
    ]
    assert main(["train", *_models(setup), *args, "--out", str(ckpt)]) == 0
    meta = read_metadata(ckpt)
    assert json.loads(meta["train"])["steps"] == 2
    assert (tmp_path / "fuser.state.pt").is_file()  # resumable

    capsys.readouterr()
    assert (
        main(
            ["eval", *_models(setup), "--checkpoint", str(ckpt), "--data", str(setup["data"]), "--limit", "2"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"arc_easy", "arc_challenge", "openbookqa"}
    assert report["arc_easy"]["fused"]["n"] == 2

    assert (
        main(
            [
                "generate",
                *_models(setup),
                "--checkpoint",
                str(ckpt),
                "--prompt",
                "Question: Which gas?\nAnswer:",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )

    control = tmp_path / "control.safetensors"
    assert main(["train", *_models(setup), *args, "--out", str(control), "--control"]) == 0
    cmeta = read_metadata(control)
    assert cmeta["sharer"] == cmeta["receiver"]
    control_map = json.loads(cmeta["config"])["layer_map"]
    assert [r for r, _ in control_map] == [r for r, _ in json.loads(meta["config"])["layer_map"]]
    assert all(r == s for r, s in control_map)  # the receiver's own layer at each fused layer


def test_a_checkpoint_for_another_pair_is_refused(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "fuser.safetensors"
    args = [
        "--data",
        str(setup["data"]),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--hidden",
        "4",
        "--no-progress",
    ]
    assert main(["train", *_models(setup), *args, "--out", str(ckpt)]) == 0
    swapped = ["--receiver", str(setup["receiver"]), "--sharer", str(setup["receiver"])]
    capsys.readouterr()
    assert (
        main(["generate", *swapped, "--checkpoint", str(ckpt), "--prompt", "Question: x y z\nAnswer:"]) == 1
    )
    assert "sharer" in capsys.readouterr().err
