"""Model loading: packaged-model lookup, GGUF assembly from wheels, loading a local model directory."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from cachelm.engine import models as models_cli
from cachelm.engine.loader import (
    PACKAGED_MODELS,
    PackagedModel,
    _extract,
    list_models,
    load_model,
    packaged_model_path,
)
from cachelm.engine.tiny import tiny_llama, tiny_tokenizer
from cachelm.errors import ConfigError


def test_packaged_model_path_missing_names_the_pull_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cachelm models pull smollm2"):
        packaged_model_path("smollm2", tmp_path)


def test_packaged_model_path_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`name`"):
        packaged_model_path("llama70b", tmp_path)  # type: ignore[arg-type]


def test_packaged_model_path_finds_pulled_file(tmp_path: Path) -> None:
    spec = PACKAGED_MODELS["gemma3"]
    (tmp_path / spec.filename).write_bytes(b"GGUF")
    assert packaged_model_path("gemma3", tmp_path) == tmp_path / spec.filename
    listed = {s.name: p for s, p in list_models(tmp_path)}
    assert listed == {"smollm2": None, "gemma3": tmp_path / spec.filename}


def test_extract_joins_split_parts_in_member_order(tmp_path: Path) -> None:
    # Two real wheels (zip files), parts stored in reverse order across them.
    parts = [b"part-zero|", b"part-one|", b"part-two"]
    with zipfile.ZipFile(tmp_path / "b.whl", "w") as zf:
        zf.writestr("pkg_b/data/m.gguf.part00", parts[0])
    with zipfile.ZipFile(tmp_path / "a.whl", "w") as zf:
        zf.writestr("pkg_a/data/m.gguf.part02", parts[2])
        zf.writestr("pkg_a/data/m.gguf.part01", parts[1])
    joined = b"".join(parts)
    spec = PackagedModel(
        name="m",
        filename="m.gguf",
        packages=(),
        members=("pkg_b/data/m.gguf.part00", "pkg_a/data/m.gguf.part01", "pkg_a/data/m.gguf.part02"),
        sha256=hashlib.sha256(joined).hexdigest(),
        description="",
    )
    out = tmp_path / "m.gguf"
    _extract(spec, [tmp_path / "a.whl", tmp_path / "b.whl"], out)
    assert out.read_bytes() == joined


def test_models_cli_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_cli.main(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "gemma3" in out and "not pulled" in out


def test_load_model_from_directory_round_trips(tmp_path: Path) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path, attn_implementation="eager")
    ids = torch.tensor([loaded_tok("The quick brown fox").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"attn_implementation": "flash"}, "attn_implementation"), ({"device": "tpu"}, "`device`")],
)
def test_load_model_validates_arguments(tmp_path: Path, kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_model(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_load_model_rejects_unknown_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="path_or_name"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("package", ["cachelm.engine", "cachelm.kv"])
def test_lazy_exports_resolve_and_are_sorted(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError):
        module.__getattr__("nope")
