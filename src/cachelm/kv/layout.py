"""The shape of a model's KV cache, and the one tensor layout every KV block uses.

A KV block holds the keys and values of `block_size` consecutive tokens for every layer, as one tensor

    block: (T, L, 2, H, D)    T tokens, L layers, 2 = (key, value), H KV heads, D head dim

Token-major on purpose: the blocks of a prefix concatenate along dim 0 into one contiguous buffer, so a hit
copies each block with one memcpy (host→device included) instead of one strided copy per layer.

Sliding-window layers store the same full per-token KV as full-attention layers. A block therefore does not
depend on where the prompt that reuses it ends; restoring a prefix of P tokens gives a sliding layer only
the last ``min(P, W - 1)`` tokens (what transformers' `DynamicSlidingWindowLayer` keeps), and the rest of the
stored tokens of that layer are simply not read. This costs storage (for Gemma-3-270M, 15 of 18 layers are
sliding) and buys correctness for every prefix length with no per-window bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cachelm.errors import ConfigError

_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """What a model's KV cache looks like; derived sizes are properties."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_windows: tuple[int | None, ...]  # per layer: the window W of a sliding layer, None for full

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"`{name}` must be an int > 0, got {value!r}")
        if len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"`sliding_windows` must have {self.num_layers} entries, got {len(self.sliding_windows)}"
            )

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's keys and values across all layers, in `dtype`."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def block_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """(T, L, 2, H, D) for a block of `num_tokens` tokens."""
        return (num_tokens, self.num_layers, 2, self.num_kv_heads, self.head_dim)

    @classmethod
    def from_model(cls, model: Any) -> KVLayout:
        """The layout of a transformers causal LM (Llama-like or Gemma-3-like decoder).

        Raises ConfigError for layer types the prefix cache cannot restore (chunked, linear, KV sharing).
        """
        config = model.config.get_text_config(decoder=True)
        num_layers = int(config.num_hidden_layers)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:
            window = getattr(config, "sliding_window", None)
            layer_types = ["sliding_attention" if window else "full_attention"] * num_layers
        bad = sorted({t for t in layer_types if t not in _SUPPORTED_LAYER_TYPES})
        if bad:
            raise ConfigError(
                f"`model` has layer types {bad}; the KV prefix cache supports {_SUPPORTED_LAYER_TYPES}"
            )
        if getattr(config, "num_kv_shared_layers", 0):
            raise ConfigError("`model` shares KV between layers; the KV prefix cache does not support that")
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        windows = tuple(int(config.sliding_window) if t == "sliding_attention" else None for t in layer_types)
        return cls(
            num_layers=num_layers,
            num_kv_heads=heads,
            head_dim=int(head_dim),
            dtype=model.dtype,
            sliding_windows=windows,
        )
