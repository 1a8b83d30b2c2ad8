"""Fine-tuned-layer checkpoints on a tiny real BertModel, and the GPTCache/MeanCache overlap split.

No shared data and no packaged model: the base is a small randomly initialised BertModel saved to a temporary
folder, which is all `apply_checkpoint` needs (its weights file is what the checkpoint's hash pins).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from cachelm.errors import CheckpointError, ConfigError
from cachelm.semantic import MiniLMEmbedder
from cachelm.semantic.datasets import gptcache_split, normalise_question
from cachelm.semantic.finetuned import FORMAT, apply_checkpoint, read_checkpoint, save_checkpoint

TOP = "encoder.layer.1."


def tiny_bert(seed: int) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return BertModel(config).eval()


@pytest.fixture()
def base(tmp_path: Path) -> tuple[BertModel, Path]:
    model = tiny_bert(0)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model, folder


def top_layer(model: BertModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(TOP)}


def pooled(model: BertModel) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.mean(1)


def test_checkpoint_replaces_exactly_the_named_tensors(base: tuple[BertModel, Path], tmp_path: Path) -> None:
    model, folder = base
    trained = tiny_bert(1)  # stands in for fine-tuned weights: a different top layer
    path = save_checkpoint(
        tmp_path / "ft.safetensors", top_layer(trained), base_dir=folder, train_info={"seed": 7}
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = pooled(model)
    info = apply_checkpoint(model, path, base_dir=folder)
    assert info.train == {"seed": 7} and all(name.startswith(TOP) for name in info.tensors)
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith(TOP):
            assert torch.equal(value, trained.state_dict()[name]), name
        else:
            assert torch.equal(value, before[name]), name  # the frozen part is untouched
    assert not torch.allclose(pooled(model), out_before)  # and the output really changed
    # applying a checkpoint of the base's own layer gives the base's output back
    identity = save_checkpoint(
        tmp_path / "id.safetensors", top_layer(tiny_bert(0)), base_dir=folder, train_info={}
    )
    apply_checkpoint(model, identity, base_dir=folder)
    assert torch.allclose(pooled(model), out_before)


def test_float16_checkpoint_loads_into_float32(base: tuple[BertModel, Path], tmp_path: Path) -> None:
    model, folder = base
    half = {k: v.to(torch.float16) for k, v in top_layer(tiny_bert(1)).items()}
    path = save_checkpoint(tmp_path / "h.safetensors", half, base_dir=folder, train_info={})
    apply_checkpoint(model, path, base_dir=folder)
    name = next(iter(half))
    assert model.state_dict()[name].dtype == torch.float32
    assert torch.equal(model.state_dict()[name], half[name].to(torch.float32))


def test_wrong_or_corrupt_checkpoints_fail_clearly(base: tuple[BertModel, Path], tmp_path: Path) -> None:
    model, folder = base
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(garbage)
    truncated = tmp_path / "truncated.safetensors"
    good = save_checkpoint(tmp_path / "good.safetensors", top_layer(model), base_dir=folder, train_info={})
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file(top_layer(model), str(foreign), metadata={"format": "cachelm-c2c-fuser/1"})
    with pytest.raises(CheckpointError, match="format"):
        read_checkpoint(foreign)
    renamed = save_checkpoint(
        tmp_path / "renamed.safetensors",
        {"encoder.layer.9.x": torch.zeros(2)},
        base_dir=folder,
        train_info={},
    )
    with pytest.raises(CheckpointError, match="lacks"):
        apply_checkpoint(model, renamed, base_dir=folder)
    name = next(iter(top_layer(model)))
    reshaped = save_checkpoint(
        tmp_path / "reshaped.safetensors", {name: torch.zeros(3, 3)}, base_dir=folder, train_info={}
    )
    with pytest.raises(CheckpointError, match="shape"):
        apply_checkpoint(model, reshaped, base_dir=folder)
    # trained on other base weights: the base file's hash differs
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"other weights")
    stale = save_checkpoint(tmp_path / "stale.safetensors", top_layer(model), base_dir=other, train_info={})
    with pytest.raises(CheckpointError, match="base weights"):
        apply_checkpoint(model, stale, base_dir=folder)
    unchanged = pooled(tiny_bert(0))
    assert torch.allclose(pooled(model), unchanged)  # every refused checkpoint left the model as it was


def test_saved_metadata_names_format_base_and_run(base: tuple[BertModel, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    model, folder = base
    path = save_checkpoint(tmp_path / "m.safetensors", top_layer(model), base_dir=folder, train_info={"a": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(meta["base_file_sha256"]) == 64 and json.loads(meta["train"]) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_minilm_embedder_validates_the_checkpoint_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`checkpoint`"):
        MiniLMEmbedder(checkpoint=3)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="does not exist"):
        MiniLMEmbedder(checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="`quantize`"):
        MiniLMEmbedder(checkpoint=None, quantize="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`quantize`"):
        MiniLMEmbedder(checkpoint=None, device="cuda", quantize=True)
    published = MiniLMEmbedder(checkpoint=None, quantize=False)
    assert published.model_id == MiniLMEmbedder.MODEL_ID and published.checkpoint is None
    quantized = MiniLMEmbedder(checkpoint=None, device="cpu")
    assert quantized.model_id == MiniLMEmbedder.MODEL_ID + "+int8-dynamic-pc"
    assert MiniLMEmbedder(checkpoint=None, device="cuda").quantize is False  # int8 only where it runs on CPU


def write_qqp(folder: Path, gptcache: list[tuple[str, str, int]]) -> None:
    (folder / "qqp").mkdir(parents=True)
    for split, rows in (
        ("val", [("How do I learn Python?", "Best way to learn python?", 1)]),
        ("test", [("What is AI?", "Define  artificial intelligence", 0)]),
    ):
        lines = ["question1,question2,is_duplicate", *(f'"{a}","{b}",{y}' for a, b, y in rows)]
        (folder / "qqp" / f"meancache_{split}.csv").write_text("\n".join(lines) + "\n")
    items = [{"text_a": a, "text_b": b, "label": y} for a, b, y in gptcache]
    (folder / "qqp" / "gptcache_similiar_qqp_full.json").write_text(json.dumps(items))


def test_gptcache_split_holds_out_every_pair_sharing_a_meancache_question(tmp_path: Path) -> None:
    write_qqp(
        tmp_path,
        [
            ("how do i learn   python?", "Python tutorials?", 1),  # shares a val question (case, spaces)
            ("Where is Oslo?", "define artificial intelligence", 0),  # shares a test question
            ("Where is Oslo?", "Which country is Oslo in?", 1),
            ("Is tea healthy?", "Is green tea good for you?", 1),
        ],
    )
    split = gptcache_split(tmp_path)
    assert split.train.a == ["Where is Oslo?", "Is tea healthy?"]
    assert split.train.labels.tolist() == [1, 1]
    assert split.held_out.a == ["how do i learn   python?", "Where is Oslo?"]
    assert split.meancache_questions == 4
    assert normalise_question("  A  b\tC ") == "a b c"
    assert np.array_equal(split.held_out.labels, np.array([1, 0], dtype=np.int8))
