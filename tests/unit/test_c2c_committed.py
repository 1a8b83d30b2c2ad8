"""The committed fuser belongs to the packaged pair (skipped where the packaged models are not pulled)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachelm.errors import CheckpointError, ConfigError

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints" / "c2c"


@pytest.mark.slow
@pytest.mark.realmodel
def test_committed_fuser_loads_into_the_packaged_pair_and_answers() -> None:
    from cachelm.c2c import pair
    from cachelm.engine.loader import packaged_model_path

    try:
        packaged_model_path("smollm2")
        packaged_model_path("gemma3")
    except ConfigError as exc:
        pytest.skip(f"packaged models not pulled: {exc}")
    receiver, sharer = pair.load("smollm2"), pair.load("gemma3")
    path = CHECKPOINTS / "smollm2-from-gemma3.safetensors"
    assert path.stat().st_size <= 16_000_000
    fuser = pair.load_checkpoint(path, receiver, sharer)
    assert fuser.num_bytes() <= 16_000_000
    with pytest.raises(CheckpointError, match="sharer"):
        pair.load_checkpoint(path, receiver, receiver)
    control = pair.load_checkpoint(CHECKPOINTS / "smollm2-control-self.safetensors", receiver, receiver)
    assert [r for r, _ in control.config.layer_map] == [r for r, _ in fuser.config.layer_map]
    prompt = "Question: Which gas do plants absorb from the air for photosynthesis?\nAnswer:"
    scores = pair.pipeline(receiver, sharer, fuser).score([prompt], [["carbon dioxide", "helium", "neon"]])[0]
    assert max(range(3), key=scores.__getitem__) == 0
