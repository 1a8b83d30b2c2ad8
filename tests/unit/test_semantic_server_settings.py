"""The proxy's semantic settings: choosing the MiniLM checkpoint and the calibrated static threshold."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachelm.errors import CheckpointError, ConfigError
from cachelm.semantic import MiniLMEmbedder
from cachelm.semantic.decision import StaticThreshold
from cachelm.server.cli import config_from, parser
from cachelm.server.semantic_layer import SemanticLayer, SemanticSettings
from cachelm.store import MemoryStore


def layer(**settings: object) -> SemanticLayer:
    return SemanticLayer(SemanticSettings(**settings), MemoryStore())  # type: ignore[arg-type]


def test_threshold_is_a_number_or_calibrated() -> None:
    assert SemanticSettings(threshold="calibrated").threshold == "calibrated"
    with pytest.raises(ConfigError, match="'calibrated'"):
        SemanticSettings(threshold="high")
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        SemanticSettings(threshold=1.5)


def test_calibrated_threshold_is_the_embedders_measured_one() -> None:
    semantic = layer(threshold="calibrated")  # default: shipped checkpoint, int8 on this CPU machine
    expected = MiniLMEmbedder().calibrated_threshold
    assert expected is not None and semantic.threshold == expected
    rule = semantic.default.rule
    assert isinstance(rule, StaticThreshold) and rule.threshold == expected
    assert layer(threshold=0.8).threshold == 0.8 and layer().threshold is None  # δ-bounded by default


def test_calibrated_needs_a_measured_model() -> None:
    with pytest.raises(ConfigError, match="no threshold was measured for 'hashing"):
        layer(embedder="hashing", threshold="calibrated")


def test_checkpoint_choice_reaches_the_embedder(tmp_path: Path) -> None:
    published = layer(checkpoint="none").embeddings.model_id
    assert published.startswith(MiniLMEmbedder.MODEL_ID) and "+ft-" not in published
    assert "+ft-" in layer().embeddings.model_id
    with pytest.raises(CheckpointError, match="does not exist"):
        layer(checkpoint=str(tmp_path / "missing.safetensors"))


def test_cli_flags() -> None:
    args = parser().parse_args(
        ["--semantic", "--semantic-threshold", "calibrated", "--semantic-checkpoint", "none"]
    )
    config, _ = config_from(args)
    assert config.semantic_threshold == "calibrated" and config.semantic_checkpoint == "none"
    config, _ = config_from(parser().parse_args(["--semantic-threshold", "0.9"]))
    assert config.semantic_threshold == 0.9 and config.semantic_checkpoint == "default"


def test_a_relative_sqlite_store_keeps_its_semantic_index_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachelm.server.config import ServerConfig
    from cachelm.server.runtime import _semantic_layer

    monkeypatch.chdir(tmp_path)
    config = ServerConfig(store_url="sqlite://rel.db", semantic=True, semantic_embedder="hashing")
    semantic = _semantic_layer(config, MemoryStore())
    try:
        assert (tmp_path / "rel.db.semantic.sqlite").exists()  # persisted, as for sqlite:///abs.db
    finally:
        semantic.index.close()
