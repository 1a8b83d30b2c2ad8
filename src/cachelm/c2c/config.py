"""Configuration of a C2C fuser: the two models' KV shapes, the layer map, and the fuser's size.

The config travels inside every checkpoint (as JSON in the safetensors metadata), so a fuser can be rebuilt
from its file alone and checked against the models it is loaded into.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from cachelm.errors import ConfigError

LayerMapKind = Literal["terminal", "uniform"]
TokenAlignment = Literal["last", "mean", "causal"]
FuseSpan = Literal["context", "all"]
SharerPositions = Literal["receiver", "own"]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The KV cache shape of one model: `num_layers` layers of `[batch, num_kv_heads, seq, head_dim]`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{name}` must be a positive int, got {value!r}")

    @property
    def kv_dim(self) -> int:
        """Width of one token's K (or V) with the heads flattened: `num_kv_heads * head_dim`."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """The shape of a transformers model config (decoder part for multimodal configs)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_key_value_heads or text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(num_layers=int(text.num_hidden_layers), num_kv_heads=heads, head_dim=int(head_dim))


def make_layer_map(
    kind: LayerMapKind, receiver_layers: int, sharer_layers: int
) -> tuple[tuple[int, int], ...]:
    """Pairs `(receiver_layer, sharer_layer)`, one per fused receiver layer, ascending.

    "terminal" (default, as in the C2C paper) aligns the last layers of both models, then the second-last,
    and so on until the shallower model runs out; the receiver's first layers (if it is deeper) stay unfused.
    "uniform" fuses every receiver layer, each with the sharer layer at the same relative depth.
    """
    if kind not in get_args(LayerMapKind):
        raise ConfigError(f"`kind` must be one of {list(get_args(LayerMapKind))}, got {kind!r}")
    if receiver_layers < 1 or sharer_layers < 1:
        raise ConfigError(
            f"layer counts must be ≥ 1, got receiver={receiver_layers!r} sharer={sharer_layers!r}"
        )
    if kind == "terminal":
        depth = min(receiver_layers, sharer_layers)
        return tuple((receiver_layers - depth + i, sharer_layers - depth + i) for i in range(depth))
    if receiver_layers == 1:
        return ((0, sharer_layers - 1),)
    return tuple((i, round(i * (sharer_layers - 1) / (receiver_layers - 1))) for i in range(receiver_layers))


@dataclass(frozen=True, kw_only=True)
class FuserConfig:
    """Everything that fixes a fuser's parameters and how its inputs are aligned.

    `layer_map`: `(receiver_layer, sharer_layer)` pairs; each receiver layer appears at most once.
    `hidden_dim` / `mlp_layers`: size of each projection MLP (one per fused layer, separately for K and V).
    `token_alignment`: "last" maps each receiver token to the one sharer token that covers its last
    character; "mean" averages every sharer token that overlaps its characters; "causal" takes the last
    sharer token that ends within the receiver token's characters, so it never reads text the receiver
    has not read yet (align.py has the rules).
    `fuse_span`: "context" fuses the prompt's context (all but its last token) once, then the receiver
    decodes alone, as in the C2C paper; "all" fuses every position — the sharer reads the prompt and
    every continuation token too (scored options, training responses, generated tokens) and the fuser
    runs inside each receiver layer's cache update. "all" needs the "causal" alignment: any other rule
    could hand a receiver token the sharer's view of the next token.
    `sharer_positions`: "receiver" gives every sharer token the position id of the receiver token it ends in
    (so both caches carry the same positions); "own" keeps the sharer's positions 0..S-1.
    """

    receiver: ModelShape
    sharer: ModelShape
    layer_map: tuple[tuple[int, int], ...]
    hidden_dim: int = 192
    mlp_layers: int = 2
    gate_init: float = 2.0
    token_alignment: TokenAlignment = "last"
    sharer_positions: SharerPositions = "receiver"
    fuse_span: FuseSpan = "context"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layer_map:
            raise ConfigError("`layer_map` must name at least one (receiver_layer, sharer_layer) pair")
        seen: set[int] = set()
        for pair in self.layer_map:
            r, s = pair
            if not (0 <= r < self.receiver.num_layers) or not (0 <= s < self.sharer.num_layers) or r in seen:
                raise ConfigError(f"`layer_map` has an invalid or repeated pair {pair!r}")
            seen.add(r)
        sizes = (self.hidden_dim, self.mlp_layers)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ConfigError(
                f"`hidden_dim` and `mlp_layers` must be ints ≥ 1, got {self.hidden_dim!r}, "
                f"{self.mlp_layers!r}"
            )
        gate = self.gate_init
        if isinstance(gate, bool) or not isinstance(gate, int | float) or not math.isfinite(gate):
            raise ConfigError(f"`gate_init` must be a finite number, got {gate!r}")
        if self.token_alignment not in get_args(TokenAlignment):
            raise ConfigError(
                f"`token_alignment` must be one of {list(get_args(TokenAlignment))}, "
                f"got {self.token_alignment!r}"
            )
        if self.fuse_span not in get_args(FuseSpan):
            raise ConfigError(f"`fuse_span` must be 'context' or 'all', got {self.fuse_span!r}")
        if self.fuse_span == "all" and self.token_alignment != "causal":
            raise ConfigError(
                "`fuse_span` 'all' needs `token_alignment` 'causal' (other rules can read the next token), "
                f"got {self.token_alignment!r}"
            )
        if self.sharer_positions not in get_args(SharerPositions):
            raise ConfigError(
                f"`sharer_positions` must be 'receiver' or 'own', got {self.sharer_positions!r}"
            )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of every field."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FuserConfig:
        """Inverse of `to_json`; raises ConfigError on malformed input."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError(f"a JSON object is needed, got {type(raw).__name__}")
            return cls(
                receiver=ModelShape(**raw.pop("receiver")),
                sharer=ModelShape(**raw.pop("sharer")),
                layer_map=tuple((int(r), int(s)) for r, s in raw.pop("layer_map")),
                **raw,
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"`text` is not a FuserConfig JSON: {exc}") from exc
