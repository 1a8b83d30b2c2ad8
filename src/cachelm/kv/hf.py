"""Moving KV blocks in and out of transformers 5.x caches (`DynamicCache` with per-layer objects).

- `new_cache` builds the cache the model itself would build (`DynamicCache(config=...)`: full layers are
  `DynamicLayer`, sliding layers `DynamicSlidingWindowLayer`) and turns on past recording in the sliding
  layers, so they keep every token of this request instead of only the last ``W - 1``: the KV of every new
  token can then be stored, whatever the window. Attention is unaffected: a recording layer still hands
  attention only the states its mask expects.
- `restore` loads a prefix ``(P, L, 2, H, D)`` into a fresh cache: a full layer gets all P tokens, a
  sliding layer the last ``min(P, W - 1)`` and ``cumulative_length = P`` — exactly the state the layer
  would be in after a forward pass over those P tokens.
- `extract` reads the KV of the last N tokens of every layer back as ``(N, L, 2, H, D)``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from cachelm.errors import ConfigError
from cachelm.kv.layout import KVLayout

# Caches and layers are typed Any: transformers annotates `Cache.layers` as a union that includes layer
# kinds this module rejects up front (linear attention, KV-sharing dummies).


def new_cache(model: Any) -> Any:
    """An empty `DynamicCache` for `model`, sliding layers recording their past (see the module docstring)."""
    cache: Any = DynamicCache(config=model.config)
    layer: Any
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.record_past = True  # what `activate_past_recording()` does (it is unannotated)
        elif not isinstance(layer, DynamicLayer):
            raise ConfigError(f"`model` uses cache layer {type(layer).__name__}, which cannot be restored")
    return cache


def restore(cache: Any, prefix: torch.Tensor, layout: KVLayout, *, whole: bool = False) -> None:
    """Load `prefix` ``(P, L, 2, H, D)`` into the empty `cache` (the state after a forward over P tokens).

    `whole`: sliding layers keep all P tokens too, as a recording layer (see `new_cache`) holds every token
    its forward passes saw — so that `extract` can read back tokens older than the window (used when the
    P tokens were computed outside the cache, e.g. by the static runner, and must still be stored).
    """
    num_tokens = prefix.shape[0]
    if prefix.dim() != 5 or prefix.shape[1:] != layout.block_shape(num_tokens)[1:]:
        raise ConfigError(
            f"`prefix` must have shape {('P', *layout.block_shape(0)[1:])}, got {tuple(prefix.shape)}"
        )
    if len(cache.layers) != layout.num_layers:
        raise ConfigError(f"`cache` has {len(cache.layers)} layers, the layout {layout.num_layers}")
    for i, layer in enumerate(cache.layers):
        window = layout.sliding_windows[i]
        if whole and window is not None and not getattr(layer, "record_past", False):
            raise ConfigError("`whole` needs a cache whose sliding layers record their past (`new_cache`)")
        keep = num_tokens if window is None or whole else min(num_tokens, window - 1)
        kv = prefix[num_tokens - keep :, i].permute(1, 2, 0, 3).unsqueeze(1)  # (2, 1, H, keep, D)
        keys, values = kv[0], kv[1]
        layer.lazy_initialization(keys, values)
        # Assign rather than `update`: update would concatenate (one more copy) and, for a sliding layer,
        # count only `keep` tokens instead of P.
        layer.keys, layer.values = keys, values
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = num_tokens


def extract(cache: Any, num_tokens: int) -> torch.Tensor:
    """The KV of the last `num_tokens` tokens of every layer, ``(N, L, 2, H, D)``, contiguous."""
    per_layer = []
    for layer in cache.layers:
        if layer.keys is None or layer.keys.shape[0] != 1:
            raise ConfigError("`cache` must hold exactly one sequence (batch size 1)")
        if layer.keys.shape[-2] < num_tokens:
            raise ConfigError(
                f"`num_tokens` {num_tokens} exceeds the {layer.keys.shape[-2]} tokens a layer holds"
            )
        per_layer.append(torch.stack([layer.keys[0, :, -num_tokens:], layer.values[0, :, -num_tokens:]]))
    stacked = torch.stack(per_layer)  # (L, 2, H, N, D)
    return stacked.permute(3, 0, 1, 2, 4).contiguous()  # (N, L, 2, H, D)
