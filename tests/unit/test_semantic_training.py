"""Fine-tuning every MiniLM layer from a bundle (`cachelm.semantic.training`), on a tiny real BertModel.

No shared data and no packaged model: the base is a small randomly initialised BertModel saved to a temporary
folder, the QQP files are a few made-up rows, and the tokenizer is a word hash — which is all the bundle
writer, the trainer and `benchmarks/semantic_finetune_full.py` (run here on the CPU) need.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from cachelm.errors import CheckpointError, ConfigError
from cachelm.semantic.finetuned import (
    apply_checkpoint,
    calibrated_threshold,
    join_checkpoint_parts,
    read_checkpoint,
    record_calibration,
    save_checkpoint_parts,
)
from cachelm.semantic.training import (
    WORD_EMBEDDINGS,
    TokenTexts,
    TrainConfig,
    TrainingStopped,
    bucketed_vectors,
    cosent_loss,
    encode,
    evaluate,
    in_batch_loss,
    read_bundle,
    sentence_vectors,
    train,
    trained_tensors,
    warmup_linear,
    write_bundle,
)
from tests.scripts import load_benchmark

VOCAB, CLS, SEP = 60, 1, 2
CPU = torch.device("cpu")


def tokenize(texts: list[str], max_len: int) -> list[list[int]]:
    """A stand-in word-piece tokenizer: [CLS] word hashes [SEP], truncated like the real one."""
    out = []
    for text in texts:
        words = [3 + zlib.crc32(w.encode()) % 40 for w in text.lower().split()]  # ids 3..42 of 60
        out.append([CLS, *words[: max_len - 2], SEP])
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = BertModel(config)  # with a pooler, as the package's file has
    folder = tmp_path_factory.mktemp("base")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config.to_json_string())
    return folder


QUESTIONS = [
    ("how do i learn python", "best way to learn python", 1),
    ("where is oslo", "which country is oslo in", 1),
    ("is tea healthy", "is green tea good for you", 1),
    ("what is ai", "how tall is mount everest", 0),
    ("how to cook rice", "why is the sky blue", 0),
    ("best pizza in naples", "cheap flights to rome", 0),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "qqp").mkdir()
    val = [("what is a cat", "define cat", 1), ("red car", "blue sea", 0), ("big dog", "large dog", 1)]
    test = [("what is a dog", "define dog", 1), ("green tree", "loud music", 0)]
    for split, rows in (("val", val), ("test", test)):
        lines = ["question1,question2,is_duplicate", *(f'"{a}","{b}",{y}' for a, b, y in rows)]
        (folder / "qqp" / f"meancache_{split}.csv").write_text("\n".join(lines) + "\n")
    train_rows = [(f"{a} {i}", f"{b} {i}", y) for i in range(8) for a, b, y in QUESTIONS]
    train_rows.append(("what is a cat", "a cat is what", 1))  # shares a val question: held out
    items = [{"text_a": a, "text_b": b, "label": y} for a, b, y in train_rows]
    (folder / "qqp" / "gptcache_similiar_qqp_full.json").write_text(json.dumps(items))
    return folder


@pytest.fixture(scope="module")
def bundle_dir(base_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(
        out, data_dir=data_dir, model_dir=base_dir, base_sha256="ab" * 32, tokenize=tokenize, train_max_len=6
    )
    return out


def test_cosent_loss_ranks_duplicates_above_the_rest() -> None:
    labels = torch.tensor([1.0, 0.0, 1.0])
    cos = torch.tensor([0.9, 0.2, 0.7])
    expected = torch.tensor(math.log(1 + math.exp(20 * (0.2 - 0.9)) + math.exp(20 * (0.2 - 0.7))))
    assert torch.allclose(cosent_loss(cos, labels, 20.0), expected, rtol=1e-3)
    assert float(cosent_loss(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 0.0]), 20.0)) > 15  # misordered
    assert float(cosent_loss(cos, torch.ones(3), 20.0)) == 0.0  # nothing to order: log(1)


def test_in_batch_loss_prefers_the_own_partner() -> None:
    a = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert float(in_batch_loss(a, a, labels, 20.0)) < float(in_batch_loss(a, a.roll(1, 0), labels, 20.0))
    assert float(in_batch_loss(a, a, torch.zeros(4), 20.0)) == 0.0


def test_warmup_then_linear_decay() -> None:
    f = warmup_linear(10, 2)
    assert [round(f(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_padded_truncates_like_the_tokenizer() -> None:
    texts = TokenTexts(ids=np.array([1, 5, 6, 7, 8, 2, 1, 9, 2], np.uint16), offsets=np.array([0, 6, 9]))
    ids, lengths = texts.padded(4, sep_id=2)
    assert ids.tolist() == [[1, 5, 6, 2], [1, 9, 2, 0]] and lengths.tolist() == [4, 3]
    ids, lengths = texts.padded(10, np.array([1]), sep_id=2)
    assert ids.tolist() == [[1, 9, 2]] and lengths.tolist() == [3]


def test_bundle_holds_the_disjoint_pairs_and_the_cut_vocabulary(bundle_dir: Path, base_dir: Path) -> None:
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    assert m["pairs"] == {"train": 48, "meancache-val": 3, "meancache-test": 2}
    assert m["gptcache_pairs_removed_for_overlap"] == 1 and m["base_file_sha256"] == "ab" * 32
    assert len(bundle.pairs["train"]) == 48 and bundle.pairs["train"].labels.sum() == 24
    vocab = np.load(bundle_dir / "data.npz")["vocab_ids"]
    assert vocab[0] == 0 and len(vocab) == m["vocab_rows"] < VOCAB  # [PAD] first, unused rows gone
    assert bundle.config["vocab_size"] == len(vocab)
    # The cut model gives the base model's vectors for the same texts (float16 weights aside).
    base = BertModel.from_pretrained(str(base_dir), add_pooling_layer=False).eval()
    compact, lengths = bundle.texts["eval"].padded(64, sep_id=bundle.sep_id)
    original = torch.from_numpy(vocab.astype(np.int64))[compact] * (compact > 0)  # back to base ids
    ours = encode(bundle.build_model(CPU), compact, lengths)
    ref = encode(base, original, lengths)
    assert torch.allclose(ours, ref, atol=2e-3)


def test_bundle_refuses_changed_files(bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("16", "17", 1))
    with pytest.raises(ConfigError, match=r"config\.json"):
        read_bundle(copy)
    with pytest.raises(ConfigError, match="manifest"):
        read_bundle(tmp_path)


def test_train_changes_exactly_the_configured_parameters(bundle_dir: Path) -> None:
    bundle = read_bundle(bundle_dir)
    base = bundle.build_model(CPU).state_dict()
    config = TrainConfig(epochs=2, batch=8, lr=1e-3, layers=1, embeddings=True, in_batch=0.5, max_len=8)
    result = train(bundle, config, device=CPU, log=lambda _: None)
    assert result.steps == 12 and np.isfinite(result.final_loss)
    tensors = trained_tensors(result)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert WORD_EMBEDDINGS not in tensors  # the cut table never leaves the bundle
    assert {"embeddings.position_embeddings.weight", "encoder.layer.1.output.dense.weight"} <= set(tensors)
    assert not any(name.startswith("encoder.layer.0.") for name in tensors)
    after = result.bert.state_dict()
    for name, value in base.items():
        assert torch.equal(value, after[name]) != (name in tensors), name
    info = result.info()
    assert info["layers_trained"] == [1] and info["steps"] == 12
    scores = evaluate(result.bert, bundle, device=CPU)
    assert 0 <= scores["val_f1"] <= 1 and scores["pairs"] == {"meancache-val": 3, "meancache-test": 2}
    with pytest.raises(TrainingStopped):
        train(bundle, config, device=CPU, log=lambda _: None, deadline=0.0)


def test_length_buckets_give_the_same_vectors_and_gradients(bundle_dir: Path) -> None:
    """A step's texts run in groups of similar length; vectors, order and gradients are those of one batch."""
    bundle = read_bundle(bundle_dir)
    bert = bundle.build_model(CPU)
    ids, full = bundle.texts["train"].padded(12, sep_id=bundle.sep_id)  # (n, 12), (n,)
    gen = torch.Generator().manual_seed(0)
    # Mixed lengths in no order (the tokens past a length are masked, as padding is).
    lengths = torch.minimum(full, torch.randint(2, int(full.max()) + 1, full.shape, generator=gen))
    assert len(set(lengths.tolist())) > 2
    weights = torch.randn(len(ids), 1, generator=gen)

    def run(buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
        bert.zero_grad(set_to_none=True)
        vectors = bucketed_vectors(bert, ids, lengths, buckets)  # (n, d)
        (vectors * weights).sum().backward()  # type: ignore[no-untyped-call]
        grad = bert.encoder.layer[0].attention.self.query.weight.grad
        assert grad is not None
        return vectors.detach(), grad.clone()

    reference = sentence_vectors(bert, ids, lengths).detach()
    one, grad_one = run(1)
    four, grad_four = run(4)
    torch.testing.assert_close(one, reference)
    torch.testing.assert_close(four, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_four, grad_one, rtol=1e-4, atol=1e-6)
    # Distinct rows, so the order check above can fail.
    assert len({tuple(v.round(decimals=4).tolist()) for v in reference}) > 2


def test_train_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="`layers`"):
        TrainConfig(layers=7)
    with pytest.raises(ConfigError, match="`epochs`"):
        TrainConfig(epochs=0)
    assert TrainConfig().name == "lr5e-05-ep3-b256-s20-L6-len64-seed0"


def test_checkpoint_parts_split_and_join(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {f"encoder.layer.{i}.w": torch.randn(64, 64).half() for i in range(3)}  # 8 KiB each
    sha = "cd" * 32
    parts = save_checkpoint_parts(
        tmp_path / "ft.safetensors", tensors, base_sha256=sha, train_info={"x": 1}, max_part_bytes=20_000
    )
    assert [p.name for p in parts] == ["ft.part-1-of-2.safetensors", "ft.part-2-of-2.safetensors"]
    with pytest.raises(CheckpointError, match="part 1/2"):
        read_checkpoint(parts[0])  # a part alone would leave the other layers at base weights
    with pytest.raises(CheckpointError, match=r"\[2\] of 2 missing"):
        join_checkpoint_parts(parts[:1], tmp_path / "joined.safetensors")
    with pytest.raises(CheckpointError, match="both part 1/2"):
        join_checkpoint_parts([parts[0], parts[0]], tmp_path / "joined.safetensors")
    other = save_checkpoint_parts(
        tmp_path / "o.safetensors", tensors, base_sha256=sha, train_info={"x": 2}, max_part_bytes=20_000
    )
    with pytest.raises(CheckpointError, match="same run"):
        join_checkpoint_parts([parts[0], other[1]], tmp_path / "joined.safetensors")
    joined = join_checkpoint_parts(list(reversed(parts)), tmp_path / "joined.safetensors")
    info, back = read_checkpoint(joined)
    assert info.train == {"x": 1} and info.base_file_sha256 == "cd" * 32
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_full_layer_checkpoint_applies_to_the_full_vocabulary_model(
    bundle_dir: Path, base_dir: Path, tmp_path: Path
) -> None:
    """What the GPU run returns (parts trained on the cut model) loads into the real, uncut model."""
    from cachelm.semantic.finetuned import base_file_sha256

    bundle = read_bundle(bundle_dir)
    result = train(bundle, TrainConfig(epochs=1, batch=8, lr=1e-3), device=CPU, log=lambda _: None)
    parts = save_checkpoint_parts(
        tmp_path / "ft.safetensors",
        trained_tensors(result),
        base_sha256=base_file_sha256(base_dir),
        train_info=result.info(),
        max_part_bytes=4_000,
    )
    joined = join_checkpoint_parts(parts, tmp_path / "ft.safetensors")
    full = BertModel.from_pretrained(str(base_dir), add_pooling_layer=False).eval()
    info = apply_checkpoint(full, joined, base_dir=base_dir)
    assert info.train["layers_trained"] == [0, 1] and len(parts) > 1
    state = full.state_dict()
    for name, value in trained_tensors(result).items():
        assert torch.equal(state[name], value.float()), name


def test_calibration_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    assert calibrated_threshold("m", path) is None  # no file: never calibrated
    record_calibration("m", {"threshold": 0.9, "f1_val": 0.85}, path)
    record_calibration("n", {"threshold": 0.7}, path)
    assert calibrated_threshold("m", path) == 0.9 and calibrated_threshold("n", path) == 0.7
    assert calibrated_threshold("other", path) is None
    with pytest.raises(ConfigError, match="threshold"):
        record_calibration("m", {"f1": 1}, path)
    path.write_text("[]")
    with pytest.raises(CheckpointError, match="calibration"):
        calibrated_threshold("m", path)


def test_full_finetune_script_end_to_end_on_cpu(bundle_dir: Path, tmp_path: Path) -> None:
    script = load_benchmark("semantic_finetune_full")
    out = tmp_path / "out"
    args = ["train", "--bundle", str(bundle_dir), "--out", str(out), "--device", "cpu"]
    assert script.main([*args, "--set", "epochs=1,batch=8,max_len=8", "--budget-s", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["best"] == results["runs"][0]["name"] and len(results["runs"]) == 1  # budget: one run
    assert results["skipped"]
    parts = sorted(out.glob("*.part-*.safetensors"))
    assert len(parts) == 1  # the tiny model fits one part
    assert script.main(["join", str(tmp_path / "ft.safetensors"), *map(str, parts)]) == 0
    info, _ = read_checkpoint(tmp_path / "ft.safetensors")
    assert info.train["val_f1"] == round(results["runs"][0]["eval"]["val_f1"], 4)
    assert info.train["selected_by"].startswith("best-threshold F1 on MeanCache val")


def test_training_imports_no_serving_stack() -> None:
    """The GPU host has no orjson (cachelm.keys) nor the index libraries: the training modules must not
    need them."""
    code = (
        "import sys\n"
        "import cachelm.semantic.training, cachelm.semantic.finetuned\n"
        "bad = sorted(m for m in ('orjson', 'cachelm.keys', 'hnswlib', 'cachelm.semantic.cache') "
        "if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lazy_exports_match_all() -> None:
    import cachelm.semantic as semantic

    assert semantic.__all__ == sorted(semantic._EXPORTS)
    assert semantic.MiniLMEmbedder.__name__ == "MiniLMEmbedder"
    with pytest.raises(AttributeError, match="nope"):
        semantic.nope  # noqa: B018
