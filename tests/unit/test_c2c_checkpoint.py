"""Fuser checkpoints: round trip, refusal to load into a pair it was not trained for, the tensor checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cachelm.c2c import pair
from cachelm.c2c.checkpoint import FORMAT, LEGACY_FORMAT, checkpoint_digest, model_fingerprint, read_metadata
from cachelm.errors import CheckpointError, ConfigError
from cachelm.kv.codecs import checksum
from tests.unit.test_c2c_support import (
    randomize,
    receiver_model,
    receiver_tokenizer,
    rewrite_metadata,
    sharer_model,
    sharer_tokenizer,
)


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return (
        pair.from_objects("tiny-llama", receiver_model(), receiver_tokenizer()),
        pair.from_objects("tiny-gemma3", sharer_model(), sharer_tokenizer()),
    )


def _saved(models: tuple[Any, Any], path: Path) -> Any:
    receiver, sharer = models
    fuser = pair.new_fuser(receiver, sharer, hidden_dim=16, token_alignment="mean")
    randomize(fuser)
    with torch.no_grad():
        for p in fuser.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # stored as bf16: make the round trip exact
        fuser.gate_logits.copy_(torch.tensor([0.3, -0.2, 1e-3]))
    from cachelm.c2c.checkpoint import save_fuser

    save_fuser(
        fuser,
        path,
        receiver_fingerprint=receiver.fingerprint,
        sharer_fingerprint=sharer.fingerprint,
        train_info={"steps": 3},
    )
    return fuser.eval()


def test_round_trip_restores_config_weights_and_gates(models: tuple[Any, Any], tmp_path: Path) -> None:
    fuser = _saved(models, tmp_path / "f.safetensors")
    loaded = pair.load_checkpoint(tmp_path / "f.safetensors", *models)
    assert loaded.config == fuser.config
    assert not loaded.training
    for (name, a), b in zip(fuser.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.gates().tolist() == [1.0, 0.0, 1.0]
    meta = read_metadata(tmp_path / "f.safetensors")
    assert meta["receiver"] == models[0].fingerprint and '"steps": 3' in meta["train"]
    prompts, options = ["Question: Which café?\nAnswer:"], [["a café", "東京"]]
    assert pair.pipeline(*models, fuser).score(prompts, options) == pair.pipeline(*models, loaded).score(
        prompts, options
    )


def test_loading_into_another_pair_raises_checkpoint_error(models: tuple[Any, Any], tmp_path: Path) -> None:
    receiver, sharer = models
    _saved(models, tmp_path / "f.safetensors")
    other_receiver = pair.from_objects("other", receiver_model(seed=7), receiver_tokenizer())
    assert other_receiver.fingerprint != receiver.fingerprint
    with pytest.raises(CheckpointError, match="receiver"):
        pair.load_checkpoint(tmp_path / "f.safetensors", other_receiver, sharer)
    with pytest.raises(CheckpointError, match="sharer"):
        pair.load_checkpoint(tmp_path / "f.safetensors", receiver, receiver)  # swapped sharer


def test_files_that_are_not_fuser_checkpoints_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        read_metadata(junk)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="not a C2C fuser"):
        read_metadata(tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="`path`"):
        read_metadata(tmp_path / "missing.safetensors")


def test_fingerprint_ignores_dtype_but_sees_weights_and_tokenizer() -> None:
    model = receiver_model()
    fp32 = model_fingerprint(model, receiver_tokenizer())
    bf16 = model_fingerprint(receiver_model().to(torch.bfloat16), receiver_tokenizer())
    assert fp32 == bf16  # the same weights loaded as float32 (CPU) or bfloat16 (GPU)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0
    assert model_fingerprint(model, receiver_tokenizer()) != fp32
    assert model_fingerprint(receiver_model(), sharer_tokenizer()) != fp32


# -- the tensor checksum: damaged bytes fail at load, legacy (format 1) files load unverified -------------


def _flip_byte(path: Path, tensor: str) -> None:
    """Flip the low bit of one byte in the middle of `tensor`'s data region (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(bytes(data[8 : 8 + header_len]))[tensor]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_saved_checkpoint_carries_the_checksum_of_its_stored_tensors(
    models: tuple[Any, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "f.safetensors"
    _saved(models, path)
    meta = read_metadata(path)
    assert meta["format"] == FORMAT
    assert meta["xxh3_128"] == checkpoint_digest(load_file(str(path)), meta, "xxh3_128")
    assert meta["xxh3_128"] != checksum(load_file(str(path)), "xxh3_128")  # the metadata is covered too
    pair.load_checkpoint(path, *models)  # verified on load


@pytest.mark.parametrize("field", ["config", "train", "receiver_file_sha256"])
def test_edited_metadata_is_a_checkpoint_error(models: tuple[Any, Any], tmp_path: Path, field: str) -> None:
    path = tmp_path / "f.safetensors"
    _saved(models, path)
    value = read_metadata(path)[field]
    # Edits that still parse and fit the models: they loaded silently before (the config one then fused
    # with another token alignment than the one trained).
    edited = {
        "config": value.replace('"token_alignment": "mean"', '"token_alignment": "last"'),
        "train": value.replace('"steps": 3', '"steps": 4'),
        "receiver_file_sha256": "0" * 64,
    }[field]
    assert edited != value
    rewrite_metadata(path, **{field: edited})
    with pytest.raises(CheckpointError, match=r"f\.safetensors.*checksum"):
        pair.load_checkpoint(path, *models)


@pytest.mark.parametrize("tensor", ["gate_logits", "key_projectors.0.mlp.0.weight"])  # float32, bfloat16
def test_a_flipped_byte_in_a_tensor_is_a_checkpoint_error(
    models: tuple[Any, Any], tmp_path: Path, tensor: str
) -> None:
    path = tmp_path / "f.safetensors"
    _saved(models, path)
    _flip_byte(path, tensor)
    read_metadata(path)  # the header is intact: only the bytes give the damage away
    with pytest.raises(CheckpointError, match=r"f\.safetensors.*checksum"):  # loaded silently before
        pair.load_checkpoint(path, *models)


# A checksum field that is present is always checked, in the legacy format too.
@pytest.mark.parametrize("format_tag", [FORMAT, LEGACY_FORMAT], ids=["current", "legacy"])
@pytest.mark.parametrize("garbled", ["0" * 32, "not a digest", ""], ids=["zeros", "not-hex", "empty"])
def test_a_garbled_checksum_field_is_a_checkpoint_error(
    models: tuple[Any, Any], tmp_path: Path, format_tag: str, garbled: str
) -> None:
    path = tmp_path / "f.safetensors"
    _saved(models, path)
    rewrite_metadata(path, format=format_tag, xxh3_128=garbled)
    with pytest.raises(CheckpointError, match=r"f\.safetensors.*xxh3_128 checksum"):
        pair.load_checkpoint(path, *models)


def test_a_current_checkpoint_without_its_checksum_is_refused(
    models: tuple[Any, Any], tmp_path: Path
) -> None:
    path = tmp_path / "f.safetensors"
    _saved(models, path)
    rewrite_metadata(path, xxh3_128=None)
    with pytest.raises(CheckpointError, match="lacks a checksum"):  # stripping it must not skip the check
        read_metadata(path)


def test_a_legacy_checkpoint_without_a_checksum_loads(models: tuple[Any, Any], tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    fuser = _saved(models, path)
    rewrite_metadata(path, format=LEGACY_FORMAT, xxh3_128=None)  # as written before checksums
    loaded = pair.load_checkpoint(path, *models)
    for (name, a), b in zip(fuser.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
