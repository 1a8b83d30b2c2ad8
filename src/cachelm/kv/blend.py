"""Non-prefix KV reuse: a chunk's cached KV reused at another position (CacheBlend, Yao et al., 2025).

A document's KV computed once (alone, from position 0) is reused inside prompts where it sits elsewhere —
after a different system prompt, between other chunks. Two things are wrong with the cached KV there:

1. **Positions.** Keys carry rotary position: ``K = R(pos)·k``. Rotations compose, ``R(p + δ) = R(δ)·R(p)``,
   so re-positioning is exact: rotate the cached keys by the offset δ (`reposition`). This holds for every
   frequency-only rope variant (default, linear, llama3, yarn — the model's `inv_freq` already carries the
   scaling, and yarn's amplitude factor is already inside the cached keys). Rope variants whose frequencies
   depend on the sequence length (dynamic NTK, longrope) are refused. Values carry no position.
2. **Cross-attention.** The chunk's KV never attended to what now precedes it. CacheBlend's fix: compute
   layer 0 for every token (cheap: one layer), compute layer 1's K/V for every token, pick the chunk tokens
   whose fresh layer-1 K/V deviate most from the cached ones (the top `recompute_ratio`), and from layer 1
   on recompute only those tokens plus the uncached ones (system prompt, question). Everyone else keeps
   its cached KV. ``recompute_ratio = 1`` is full recompute; 0 is pure reuse.

`blend_prefill` implements this for Llama-architecture models (full attention). Gemma-3's sliding layers
would need the windowed mask in the partial layers; it is refused rather than approximated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cachelm.errors import ConfigError
from cachelm.kv.layout import KVLayout


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_inv_freqs(model: Any) -> list[torch.Tensor]:
    """The rotary inverse frequencies ``(D/2,)`` each layer's keys were rotated with."""
    config = model.config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None) or {}
    flat = [params] if "rope_type" in params else list(params.values())
    for p in flat:
        kind = str((p or {}).get("rope_type", "default"))
        if "dynamic" in kind or "longrope" in kind:
            raise ConfigError(
                f"rope type {kind!r} depends on the sequence length: keys cannot be re-positioned"
            )
    rotary = model.model.rotary_emb
    layout = KVLayout.from_model(model)
    if hasattr(rotary, "inv_freq"):
        return [rotary.inv_freq.float()] * layout.num_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * layout.num_layers
    return [getattr(rotary, f"{t}_inv_freq").float() for t in types]


def reposition(kv: torch.Tensor, delta: int, inv_freqs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`kv` ``(n, L, 2, H, D)`` computed at positions p.. moved to p + `delta` (keys rotated, values kept)."""
    if delta == 0:
        return kv
    out = kv.clone()
    for layer, inv_freq in enumerate(inv_freqs):
        angle = delta * inv_freq.to(kv.device)  # (D/2,)
        emb = torch.cat((angle, angle))  # (D,) same duplication as HF's rotary embedding
        cos, sin = emb.cos(), emb.sin()
        keys = kv[:, layer, 0].float()  # (n, H, D)
        out[:, layer, 0] = (keys * cos + _rotate_half(keys) * sin).to(kv.dtype)
    return out


@dataclass(frozen=True, kw_only=True)
class Segment:
    """A piece of a prompt: its token ids and, when reused, the KV it was cached with.

    `kv` is ``(len(token_ids), L, 2, H, D)`` computed with the segment starting at position `kv_start`
    (0 when the chunk was prefilled alone); None means "compute it".
    """

    token_ids: Sequence[int]
    kv: torch.Tensor | None = None
    kv_start: int = 0


@dataclass(frozen=True, kw_only=True)
class BlendResult:
    logits: torch.Tensor  # (V,) after the last token
    kv: torch.Tensor  # (T, L, 2, H, D) the blended KV of the whole prompt (restore it to keep decoding)
    num_tokens: int
    num_reused: int  # tokens whose cached KV was kept from layer 1 on
    recomputed: list[int]  # positions of the cached tokens that were recomputed

    @property
    def compute_fraction(self) -> float:
        """Approximate share of a full prefill's work this blend did (layer 0 for all, then the rest)."""
        layers = self.kv.shape[1]
        return (self.num_tokens + (layers - 1) * (self.num_tokens - self.num_reused)) / (
            layers * self.num_tokens
        )


def _check_model(model: Any) -> KVLayout:
    if model.config.model_type != "llama":
        raise ConfigError(
            f"`model` must be a Llama-architecture model for blending, got {model.config.model_type!r}"
        )
    return KVLayout.from_model(model)


@torch.inference_mode()
def blend_prefill(model: Any, segments: Sequence[Segment], *, recompute_ratio: float = 0.15) -> BlendResult:
    """Prefill the concatenated `segments`, reusing the cached ones (see the module docstring)."""
    layout = _check_model(model)
    if not segments:
        raise ConfigError("`segments` must not be empty")
    if not 0 <= recompute_ratio <= 1:
        raise ConfigError(f"`recompute_ratio` must be in [0, 1], got {recompute_ratio!r}")
    device, dtype = torch.device(model.device), model.dtype
    inv_freqs = layer_inv_freqs(model)
    ids: list[int] = []
    cached_parts: list[tuple[int, torch.Tensor]] = []
    for seg in segments:
        if seg.kv is not None:
            expected = layout.block_shape(len(seg.token_ids))
            if tuple(seg.kv.shape) != expected:
                raise ConfigError(f"segment `kv` must have shape {expected}, got {tuple(seg.kv.shape)}")
            cached_parts.append((len(ids), reposition(seg.kv.to(device), len(ids) - seg.kv_start, inv_freqs)))
        ids.extend(int(t) for t in seg.token_ids)
    if segments[-1].kv is not None:
        raise ConfigError("the last segment must be computed (its last token's logits are needed)")
    num_tokens = len(ids)
    kv = torch.zeros(layout.block_shape(num_tokens), dtype=dtype, device=device)  # (T, L, 2, H, D)
    cached = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for start, part in cached_parts:
        kv[start : start + part.shape[0]] = part
        cached[start : start + part.shape[0]] = True

    inner = model.model
    n_heads = model.config.num_attention_heads
    positions = torch.arange(num_tokens, device=device)
    h = inner.embed_tokens(torch.tensor([ids], device=device))[0]  # (T, d)
    cos, sin = inner.rotary_emb(h[None], positions[None])  # (1, T, D)
    active = positions  # the positions whose hidden states are carried forward
    recomputed: list[int] = []
    for layer_idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)  # (A, d)
        q = attn.q_proj(x).view(-1, n_heads, layout.head_dim)  # (A, Hq, D)
        k = attn.k_proj(x).view(-1, layout.num_kv_heads, layout.head_dim)  # (A, H, D)
        v = attn.v_proj(x).view(-1, layout.num_kv_heads, layout.head_dim)  # (A, H, D)
        c, s = cos[0, active][:, None], sin[0, active][:, None]  # (A, 1, D)
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        if layer_idx == 1 and bool(cached.any()):
            # Deviation of the fresh layer-1 KV from the cached one, per cached token (CacheBlend's HKVD).
            dev = (k - kv[:, 1, 0]).float().pow(2).sum((-1, -2)) + (v - kv[:, 1, 1]).float().pow(2).sum(
                (-1, -2)
            )
            dev = dev.masked_fill(~cached, -1.0)  # (T,) uncached tokens are recomputed anyway
            n_pick = math.ceil(recompute_ratio * int(cached.sum()))
            picked = (
                torch.topk(dev, n_pick).indices if n_pick else torch.empty(0, dtype=torch.long, device=device)
            )
            keep = ~cached
            keep[picked] = True
            recomputed = sorted(picked.tolist())
            active = positions[keep]
            h, q, k, v = h[keep], q[keep], k[keep], v[keep]
        kv[active, layer_idx, 0] = k.to(dtype)
        kv[active, layer_idx, 1] = v.to(dtype)
        keys = kv[:, layer_idx, 0].transpose(0, 1)  # (H, T, D)
        values = kv[:, layer_idx, 1].transpose(0, 1)  # (H, T, D)
        mask = positions[None, :] <= active[:, None]  # (A, T) causal by absolute position
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys,
            values,
            attn_mask=mask,
            scale=attn.scaling,
            enable_gqa=n_heads != layout.num_kv_heads,
        )  # (Hq, A, D)
        h = h + attn.o_proj(o.transpose(0, 1).reshape(len(active), n_heads * layout.head_dim))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(inner.norm(h[-1:]))[0].float()  # the last token is always active
    num_reused = int(cached.sum()) - len(recomputed)
    return BlendResult(
        logits=logits, kv=kv, num_tokens=num_tokens, num_reused=num_reused, recomputed=recomputed
    )


@torch.inference_mode()
def prefill_chunk(model: Any, token_ids: Sequence[int]) -> torch.Tensor:
    """The KV ``(n, L, 2, H, D)`` of `token_ids` prefilled alone from position 0 (a cacheable chunk)."""
    from cachelm.kv import hf

    cache = hf.new_cache(model)
    model(
        input_ids=torch.tensor([list(token_ids)], device=model.device),
        past_key_values=cache,
        logits_to_keep=1,
    )
    return hf.extract(cache, len(token_ids))
