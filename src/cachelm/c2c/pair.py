"""Loading a (receiver, sharer) pair and building fusers for it.

Models come from the engine's loader (`cachelm.engine.loader.load_model`): a packaged name ("smollm2",
"gemma3"), a `.gguf` file, or a model directory. Both models are frozen on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cachelm.c2c.checkpoint import load_fuser, model_fingerprint
from cachelm.c2c.config import (
    FuserConfig,
    FuseSpan,
    LayerMapKind,
    ModelShape,
    SharerPositions,
    TokenAlignment,
    make_layer_map,
)
from cachelm.c2c.fuser import C2CFuser
from cachelm.c2c.runtime import C2CPipeline
from cachelm.engine.loader import file_sha256
from cachelm.errors import CheckpointError


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A frozen model with its tokenizer and identity."""

    name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    file_sha256: str

    @property
    def shape(self) -> ModelShape:
        return ModelShape.of(self.model.config)


def load(path_or_name: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load, freeze and fingerprint one model (see `cachelm.engine.loader.load_model`)."""
    from cachelm.engine.loader import load_model

    model, tokenizer = load_model(path_or_name, device=device, dtype=dtype)
    return from_objects(str(path_or_name), model, tokenizer)


# Written beside a model saved from a loaded one (e.g. a dequantised copy of a GGUF): the weights file it was
# made from, so checkpoints trained on the copy still record that file's hash.
SOURCE_RECORD = "cachelm-source.json"


def save_source_record(loaded: LoadedModel, folder: str | Path) -> None:
    """Record in `folder` (a saved copy of `loaded`) which weights file the copy was made from."""
    if loaded.file_sha256:
        record = {"source": Path(loaded.name).name, "file_sha256": loaded.file_sha256}
        (Path(folder) / SOURCE_RECORD).write_text(json.dumps(record) + "\n")


def from_objects(name: str, model: Any, tokenizer: Any, source_file: str | Path | None = None) -> LoadedModel:
    """Wrap an already loaded model (e.g. a tiny one built from a config in tests)."""
    model.requires_grad_(False)
    model.eval()
    sha = ""
    if source_file is not None and Path(source_file).is_file():
        sha = file_sha256(source_file)
    elif Path(name).is_file():
        sha = file_sha256(name)
    elif (Path(name) / SOURCE_RECORD).is_file():  # a saved copy: the file it was made from
        sha = str(json.loads((Path(name) / SOURCE_RECORD).read_text()).get("file_sha256", ""))
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=model_fingerprint(model, tokenizer),
        file_sha256=sha,
    )


def new_fuser(
    receiver: LoadedModel,
    sharer: LoadedModel,
    *,
    hidden_dim: int = 192,
    mlp_layers: int = 2,
    layer_map: LayerMapKind = "terminal",
    receiver_layers: tuple[int, ...] | None = None,
    token_alignment: TokenAlignment | None = None,
    sharer_positions: SharerPositions = "receiver",
    fuse_span: FuseSpan = "context",
    seed: int = 0,
) -> C2CFuser:
    """A freshly initialised fuser for the pair.

    `token_alignment` defaults to the rule `fuse_span` calls for: "last" for context fusion, "causal"
    when every position is fused (the only rule that never reads ahead there).

    `receiver_layers` restricts fusion to those receiver layers, each paired with the sharer layer at the
    same index; the fair control uses it to fuse exactly the layers the real pair fuses.
    """
    r, s = receiver.shape, sharer.shape
    pairs = (
        tuple((i, i) for i in receiver_layers)
        if receiver_layers is not None
        else make_layer_map(layer_map, r.num_layers, s.num_layers)
    )
    config = FuserConfig(
        receiver=r,
        sharer=s,
        layer_map=pairs,
        hidden_dim=hidden_dim,
        mlp_layers=mlp_layers,
        token_alignment=token_alignment or ("causal" if fuse_span == "all" else "last"),
        sharer_positions=sharer_positions,
        fuse_span=fuse_span,
    )
    # A private RNG stream: building a fuser must not reset the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return C2CFuser(config)


def pipeline(
    receiver: LoadedModel, sharer: LoadedModel | None = None, fuser: C2CFuser | None = None
) -> C2CPipeline:
    """A C2C pipeline (receiver alone when `sharer` and `fuser` are None); moves the fuser to the device."""
    if fuser is not None:
        fuser.to(next(receiver.model.parameters()).device)
    return C2CPipeline(
        receiver.model,
        receiver.tokenizer,
        None if sharer is None else sharer.model,
        None if sharer is None else sharer.tokenizer,
        fuser,
    )


def load_checkpoint(path: str | Path, receiver: LoadedModel, sharer: LoadedModel) -> C2CFuser:
    """The fuser at `path`, checked against this pair (CheckpointError otherwise), on the
    receiver's device.
    """
    device = next(receiver.model.parameters()).device
    fuser = load_fuser(
        path, receiver_fingerprint=receiver.fingerprint, sharer_fingerprint=sharer.fingerprint, device=device
    )
    # The fingerprints do not cover the stored config: a damaged one must fail here, not at the first fuse.
    for side, model in (("receiver", receiver), ("sharer", sharer)):
        stored = getattr(fuser.config, side)
        if stored != model.shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was built for a {side} of shape {stored}, "
                f"but the {side} given has {model.shape}"
            )
    return fuser
