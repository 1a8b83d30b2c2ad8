"""The committed fusers belong to the packaged pair, in both directions (skipped where the packaged models are
not pulled); their files pass the load path's own checks without the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cachelm.errors import CheckpointError, ConfigError

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints" / "c2c"


@pytest.fixture(scope="module")
def packaged_pair() -> tuple[Any, Any]:
    """SmolLM2 and Gemma-3 from the packaged GGUFs, loaded once for both directions."""
    from cachelm.c2c import pair
    from cachelm.engine.loader import packaged_model_path

    try:
        packaged_model_path("smollm2")
        packaged_model_path("gemma3")
    except ConfigError as exc:
        pytest.skip(f"packaged models not pulled: {exc}")
    return pair.load("smollm2"), pair.load("gemma3")


@pytest.mark.parametrize("path", sorted(CHECKPOINTS.glob("*.safetensors")), ids=lambda p: p.stem)
def test_committed_checkpoint_is_legacy_format_and_passes_the_integrity_check(path: Path) -> None:
    """The committed files predate checksums (format 1, never rewritten): they must keep loading."""
    from safetensors.torch import load_file

    from cachelm.c2c.checkpoint import LEGACY_FORMAT, read_metadata, verify_checksum
    from cachelm.c2c.config import FuserConfig
    from cachelm.c2c.fuser import C2CFuser

    meta = read_metadata(path)
    assert meta["format"] == LEGACY_FORMAT and "xxh3_128" not in meta
    stored = load_file(str(path))
    verify_checksum(path, meta, stored)
    C2CFuser(FuserConfig.from_json(meta["config"])).load_state_dict({k: v.float() for k, v in stored.items()})


@pytest.mark.slow
@pytest.mark.realmodel
def test_committed_fuser_loads_into_the_packaged_pair_and_answers(packaged_pair: tuple[Any, Any]) -> None:
    from cachelm.c2c import pair

    receiver, sharer = packaged_pair
    path = CHECKPOINTS / "smollm2-from-gemma3.safetensors"
    fuser = _load_and_answer(path, receiver, sharer)
    with pytest.raises(CheckpointError, match="sharer"):
        pair.load_checkpoint(path, receiver, receiver)
    control = pair.load_checkpoint(CHECKPOINTS / "smollm2-control-self.safetensors", receiver, receiver)
    assert [r for r, _ in control.config.layer_map] == [r for r, _ in fuser.config.layer_map]


@pytest.mark.slow
@pytest.mark.realmodel
def test_reverse_fusers_load_into_gemma3_reading_smollm2(packaged_pair: tuple[Any, Any]) -> None:
    from cachelm.c2c import pair

    smollm2, gemma3 = packaged_pair
    path = CHECKPOINTS / "gemma3-from-smollm2.safetensors"
    _load_and_answer(path, gemma3, smollm2)
    with pytest.raises(CheckpointError, match="receiver"):
        pair.load_checkpoint(path, smollm2, gemma3)  # the forward pair's roles
    control = pair.load_checkpoint(CHECKPOINTS / "gemma3-control-self.safetensors", gemma3, gemma3)
    assert control.num_bytes() <= 16_000_000


def _load_and_answer(path: Path, receiver: Any, sharer: Any) -> Any:
    """The fuser at `path`, checked: within the 16 MB cap on disk and in memory, right on an easy question."""
    from cachelm.c2c import pair

    assert path.stat().st_size <= 16_000_000
    fuser = pair.load_checkpoint(path, receiver, sharer)
    assert fuser.num_bytes() <= 16_000_000
    prompt = "Question: Which gas do plants absorb from the air for photosynthesis?\nAnswer:"
    scores = pair.pipeline(receiver, sharer, fuser).score([prompt], [["carbon dioxide", "helium", "neon"]])[0]
    assert max(range(3), key=scores.__getitem__) == 0
    return fuser
