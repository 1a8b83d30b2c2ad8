"""A lean suffix prefill for Llama and Gemma-3 models over a static, token-major KV buffer, CUDA-graphed.

Why: on a hit only the suffix is computed (e.g. 64 tokens). For an 8B model that is ~5 ms of weight reads
on an H100, but HF eager spends ~50 ms of per-call Python and kernel-launch overhead on it (measured in
../shared/gpu/README.md). This runner removes that overhead:

- the KV lives in one static buffer ``(max_tokens, L, 2, H, D)`` — the block layout of `cachelm.kv` — so a
  prefix hit decodes its blocks straight into the buffer (no per-layer restore copies);
- the forward is the decoder written out with the model's own modules (no cache objects, no mask
  builders, no output recorders);
- on CUDA, each (prefix length, suffix length) gets a CUDA graph captured once and replayed after, so a call
  is one graph launch;
- a graph removes launch overhead but not kernel count: a 64-token step of an 8B model is ~5 ms of weight
  reads spread over ~60 kernels per layer, most of them tiny. `fuse_weights` packs Q/K/V and gate/up into
  one GEMM each (the module weights become views of the packed tensors, so no memory is added);
  `compile` runs each layer's pre- and post-attention math (RMSNorm, RoPE, SiLU·up, residuals) through
  `torch.compile`, which fuses the elementwise kernels. Both functions take the weights as arguments, so
  one compiled graph serves every layer.

Scope: Llama-architecture causal LMs (Llama, SmolLM2) with default or scaled rope, and Gemma-3 text
models (per-head q/k norms, one rope per layer type, "sandwich" norms, sliding-window layers: their
queries read only the last W keys of the buffer, which still holds every token, as the prefix cache's
blocks do). `fuse_weights` and `compile` are Llama-only. `forward_eager` is the same math without a graph;
tests check it against HF on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cachelm.errors import ConfigError
from cachelm.kv.layout import KVLayout


def _attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention ``(B, H, M, D)`` and its log-sum-exp ``(B, H, M)``: the flash kernel on CUDA
    (it returns the log-sum-exp the merge needs), plain math elsewhere."""
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q.contiguous(), k, v, 0.0, False, False, scale=scale
        )
        return out[0], out[1][..., : q.shape[2]].float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, M, c)
    return torch.softmax(scores, dim=-1) @ v.float(), torch.logsumexp(scores, dim=-1)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic (float32 statistics, weight applied in the input dtype)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pre_attention(
    h: torch.Tensor,  # (1, S, d)
    norm_weight: torch.Tensor,
    qkv_weight: torch.Tensor,  # (Hq·D + 2·H·D, d)
    cos: torch.Tensor,  # (1, S, D)
    sin: torch.Tensor,
    eps: float,
    n_heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, packed Q/K/V projection and RoPE: q (1, Hq, S, D), k (1, H, S, D), v (1, S, H, D)."""
    num_new = h.shape[1]
    head_dim = cos.shape[-1]
    qkv = _rms_norm(h, norm_weight, eps) @ qkv_weight.t()  # (1, S, (Hq + 2H)·D)
    q, k, v = torch.split(qkv, [n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(1, num_new, n_heads, head_dim).transpose(1, 2)  # (1, Hq, S, D)
    k = k.view(1, num_new, kv_heads, head_dim).transpose(1, 2)  # (1, H, S, D)
    c, s = cos[:, None], sin[:, None]  # (1, 1, S, D)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    return q, k, v.view(1, num_new, kv_heads, head_dim)


def _post_attention(
    h: torch.Tensor,  # (1, S, d)
    o: torch.Tensor,  # (1, S, Hq·D)
    o_weight: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_up_weight: torch.Tensor,  # (2·I, d)
    down_weight: torch.Tensor,  # (d, I)
    eps: float,
) -> torch.Tensor:
    """Output projection, residual, norm, SiLU-gated MLP with packed gate/up, residual: (1, S, d)."""
    h = h + o @ o_weight.t()
    gate, up = (_rms_norm(h, norm_weight, eps) @ gate_up_weight.t()).chunk(2, dim=-1)  # (1, S, I) each
    return h + (torch.nn.functional.silu(gate) * up) @ down_weight.t()


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # (1, S) static input
    logits: torch.Tensor  # (V,) static output


class StaticRunner:
    """Suffix prefill on top of a prefix held in `kv` (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        max_tokens: int,
        use_cuda_graphs: bool | None = None,
        contiguous_kv: bool = False,
        graph_after: int = 1,
        attention: str = "sdpa",
        split_chunk: int = 256,
        fuse_weights: bool = False,
        compile: bool = False,
    ) -> None:
        """`graph_after`: calls with one (start, length) shape before a graph is captured for it (earlier
        calls run the same math ungraphed), so one-off shapes do not pay a capture.

        `attention`: "sdpa" (one masked SDPA call per layer) or "split" (split-KV: the prefix keys, which
        every suffix query sees, go in chunks of `split_chunk` through the flash kernel with their
        log-sum-exp, the suffix keys through a small masked softmax, and the parts are merged). With 64
        queries and 8K keys a single attention call keeps only a few dozen thread blocks busy; splitting
        the keys is what flash-decoding does for the same reason.

        `fuse_weights` / `compile`: see the module docstring. `compile` implies `fuse_weights` and needs a
        working `torch.compile` backend (Triton on CUDA)."""
        model_type = model.config.model_type
        if model_type not in ("llama", "gemma3_text"):
            raise ConfigError(
                f"`model` must be a Llama-architecture or Gemma-3 text model, got {model_type!r}"
            )
        self.gemma = model_type == "gemma3_text"
        if self.gemma and (
            getattr(model.config, "attn_logit_softcapping", None) is not None
            or getattr(model.config, "use_bidirectional_attention", False)
        ):
            raise ConfigError(
                "Gemma-3 models with attention soft-capping or bidirectional attention are not supported"
            )
        self.layout = KVLayout.from_model(model)
        if any(w is not None for w in self.layout.sliding_windows) and not self.gemma:
            raise ConfigError("`model` has sliding-window layers; only Gemma-3's are supported")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ConfigError(f"`max_tokens` must be an int > 0, got {max_tokens!r}")
        self.model = model
        self.device = torch.device(model.device)
        self.max_tokens = max_tokens
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        # Copy each layer's K/V head-major before attention (costs a read+write of the prefix KV per call;
        # only worth it where the attention kernel would otherwise reject the token-major strides).
        self.contiguous_kv = contiguous_kv
        self.epoch = 0  # bumped by whoever starts writing `kv` for a new prompt (Engine._prefill_static)
        if attention not in ("sdpa", "split"):
            raise ConfigError(f"`attention` must be 'sdpa' or 'split', got {attention!r}")
        if isinstance(split_chunk, bool) or not isinstance(split_chunk, int) or split_chunk <= 0:
            raise ConfigError(f"`split_chunk` must be an int > 0, got {split_chunk!r}")
        self.attention = attention
        self.split_chunk = split_chunk
        self.kv = torch.zeros(self.layout.block_shape(max_tokens), dtype=model.dtype, device=self.device)
        self._graphs: dict[tuple[int, int, bool, str, int], _Graph] = {}
        self._seen: dict[tuple[int, int, bool, str, int], int] = {}
        self.graph_after = max(1, graph_after)
        inner = model.model
        self._embed, self._layers, self._norm = inner.embed_tokens, inner.layers, inner.norm
        self._rotary, self._lm_head = inner.rotary_emb, model.lm_head
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Gemma-3's is the same

        self._apply_rope = apply_rotary_pos_emb
        self.fused = fuse_weights or compile
        cfg = model.config
        if self.fused and self.gemma:
            raise ConfigError("`fuse_weights`/`compile` support Llama-architecture models only")
        if self.fused and (
            getattr(cfg, "hidden_act", "silu") != "silu"
            or getattr(cfg, "attention_bias", False)
            or getattr(cfg, "mlp_bias", False)
        ):
            raise ConfigError("`fuse_weights`/`compile` support SiLU MLPs without biases only")
        if self.fused:
            self._pack_weights()
        self._pre: Any = _pre_attention
        self._post: Any = _post_attention
        if compile:
            self._pre = torch.compile(_pre_attention, fullgraph=True, dynamic=False)
            self._post = torch.compile(_post_attention, fullgraph=True, dynamic=False)

    @torch.no_grad()
    def _pack_weights(self) -> None:
        """Q/K/V and gate/up of every layer into one weight each; the modules keep views of them."""
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self._layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            nq, nk = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
            ni = mlp.gate_proj.weight.shape[0]
            # Views, not copies: the packed tensors are the only storage, so memory stays the same.
            attn.q_proj.weight = torch.nn.Parameter(qkv[:nq], requires_grad=False)
            attn.k_proj.weight = torch.nn.Parameter(qkv[nq : nq + nk], requires_grad=False)
            attn.v_proj.weight = torch.nn.Parameter(qkv[nq + nk :], requires_grad=False)
            mlp.gate_proj.weight = torch.nn.Parameter(gate_up[:ni], requires_grad=False)
            mlp.up_proj.weight = torch.nn.Parameter(gate_up[ni:], requires_grad=False)
            self._packed.append((qkv, gate_up))

    def _check(self, num_new: int, start: int) -> None:
        if num_new <= 0 or start < 0 or start + num_new > self.max_tokens:
            raise ConfigError(
                f"`start` {start} + {num_new} new tokens must fit in `max_tokens` {self.max_tokens}"
            )

    @torch.inference_mode()
    def forward_eager(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits ``(V,)`` after the last of `input_ids` ``(1, S)``; tokens ``< start`` must be in `kv`.

        Writes the new tokens' KV into ``kv[start : start + S]``.
        """
        num_new = input_ids.shape[-1]
        self._check(num_new, start)
        n_heads = self.model.config.num_attention_heads
        kv_heads, head_dim = self.layout.num_kv_heads, self.layout.head_dim
        end = start + num_new
        positions = torch.arange(start, end, device=self.device)[None]  # (1, S)
        # Query i (absolute position start + i) sees keys 0 .. start + i.
        mask = torch.arange(end, device=self.device)[None, :] <= positions[0, :, None]  # (S, T)
        group = n_heads // kv_heads
        mask_g = mask.repeat(group, 1)  # (G·S, T): row g·S + i is query i of group member g
        h = self._embed(input_ids)  # (1, S, d); Gemma's embedding module applies its sqrt(d) scale
        rope = self._rope(h, positions)
        window_masks = {  # one per window size, shared by its layers
            w: self._window_mask(start, end, w, group) for w in set(self.layout.sliding_windows) if w
        }
        for i, layer in enumerate(self._layers):
            attn = layer.self_attn
            cos, sin = rope[i]
            if self.fused:
                q, k, v = self._pre(
                    h,
                    layer.input_layernorm.weight,
                    self._packed[i][0],
                    cos,
                    sin,
                    layer.input_layernorm.variance_epsilon,
                    n_heads,
                    kv_heads,
                )
            else:
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, num_new, n_heads, head_dim).transpose(1, 2)  # (1, Hq, S, D)
                k = attn.k_proj(x).view(1, num_new, kv_heads, head_dim).transpose(1, 2)  # (1, H, S, D)
                v = attn.v_proj(x).view(1, num_new, kv_heads, head_dim)  # (1, S, H, D)
                if self.gemma:  # per-head RMSNorm of queries and keys, before RoPE
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k = self._apply_rope(q, k, cos, sin)
            self.kv[start:end, i, 0] = k[0].transpose(0, 1)  # (S, H, D)
            self.kv[start:end, i, 1] = v[0]
            keys = self.kv[:end, i, 0].permute(1, 0, 2)[None]  # (1, H, T, D)
            values = self.kv[:end, i, 1].permute(1, 0, 2)[None]  # (1, H, T, D)
            if self.contiguous_kv:
                keys, values = keys.contiguous(), values.contiguous()
            # GQA folded into the query length: the G query heads of one KV head become G×S query rows of
            # that head. SDPA then needs no GQA support and the memory-efficient kernel (which takes a mask)
            # runs instead of the math fallback, which would materialise scores and repeat K/V per head.
            q = q.reshape(1, kv_heads, group * num_new, head_dim)  # (1, H, G·S, D)
            window = self.layout.sliding_windows[i]
            if window is not None:
                o = self._window_attention(q, i, start, end, window_masks[window], attn.scaling)
            elif self.attention == "split":
                o = self._split_attention(q, i, start, end, mask_g[:, start:], attn.scaling)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_g, scale=attn.scaling)
            o = (
                o.reshape(1, n_heads, num_new, head_dim).transpose(1, 2).reshape(1, num_new, -1)
            )  # (1, S, Hq·D)
            if self.fused:
                mlp = layer.mlp
                h = self._post(
                    h,
                    o,
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    self._packed[i][1],
                    mlp.down_proj.weight,
                    layer.post_attention_layernorm.variance_epsilon,
                )
            elif self.gemma:  # "sandwich" norms: after attention and around the MLP
                h = h + layer.post_attention_layernorm(attn.o_proj(o))
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + attn.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = self._norm(h[:, -1:])  # (1, 1, d)
        logits: torch.Tensor = self._lm_head(last)[0, -1].float()  # (V,)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's RoPE (cos, sin) ``(1, S, D)``: Gemma-3 has one rope per layer type (local layers use
        another base frequency), Llama one for all."""
        if not self.gemma:
            both = self._rotary(h, positions)
            return [both] * len(self._layers)
        by_type = {t: self._rotary(h, positions, t) for t in set(self.model.config.layer_types)}
        return [by_type[t] for t in self.model.config.layer_types]

    def _window_mask(self, start: int, end: int, window: int, group: int) -> torch.Tensor:
        """The mask ``(G·S, T')`` of a sliding layer over keys ``start - W + 1 .. end``: a query at position p
        sees keys p - W < j <= p (HF's sliding mask)."""
        lo = max(0, start - window + 1)
        pos = torch.arange(start, end, device=self.device)[:, None]  # (S, 1)
        key_pos = torch.arange(lo, end, device=self.device)[None, :]  # (1, T')
        return ((key_pos <= pos) & (key_pos > pos - window)).repeat(group, 1)

    def _window_attention(
        self, q: torch.Tensor, layer: int, start: int, end: int, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Sliding-window attention of `q` ``(1, H, G·S, D)`` under `mask` (`_window_mask`): only the keys
        from ``end - mask.shape[1]`` on are read."""
        lo = end - mask.shape[1]
        keys = self.kv[lo:end, layer, 0].permute(1, 0, 2)[None]  # (1, H, T', D)
        values = self.kv[lo:end, layer, 1].permute(1, 0, 2)[None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    def _split_attention(
        self, q: torch.Tensor, layer: int, start: int, end: int, tail_mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of `q` ``(1, H, M, D)`` over keys ``0 .. end`` of `layer`, split into parts merged by
        log-sum-exp; `tail_mask` ``(M, end - start)`` masks the suffix keys."""
        outs: list[torch.Tensor] = []
        lses: list[torch.Tensor] = []
        chunk = self.split_chunk
        full = start // chunk
        parts = [(0, full * chunk, full)] if full else []
        if start % chunk:
            parts.append((full * chunk, start, 1))
        for lo, hi, n in parts:
            heads, dim = self.layout.num_kv_heads, self.layout.head_dim
            keys = self.kv[lo:hi, layer, 0].view(n, -1, heads, dim).permute(0, 2, 1, 3)  # (n, H, c, D)
            values = self.kv[lo:hi, layer, 1].view(n, -1, heads, dim).permute(0, 2, 1, 3)  # (n, H, c, D)
            out, lse = _attention_lse(q.expand(n, -1, -1, -1), keys, values, scale)
            outs.append(out)
            lses.append(lse)
        keys = self.kv[start:end, layer, 0].permute(1, 0, 2)[None].float()  # (1, H, S, D)
        values = self.kv[start:end, layer, 1].permute(1, 0, 2)[None].float()
        scores = (q.float() @ keys.transpose(-1, -2)) * scale  # (1, H, M, S)
        scores = scores.masked_fill(~tail_mask, float("-inf"))
        lse_tail = torch.logsumexp(scores, dim=-1)  # (1, H, M)
        outs.append(torch.softmax(scores, dim=-1) @ values)  # (1, H, M, D)
        lses.append(lse_tail)
        lse = torch.cat(lses)  # (parts, H, M)
        weights = torch.exp(lse - torch.logsumexp(lse, dim=0, keepdim=True))  # (parts, H, M)
        merged = (weights[..., None] * torch.cat([o.float() for o in outs])).sum(0, keepdim=True)
        return merged.to(q.dtype)  # (1, H, M, D)

    def __call__(self, token_ids: list[int] | torch.Tensor, start: int) -> torch.Tensor:
        """Like `forward_eager`, through a CUDA graph per (start, length) when graphs are on (captured on the
        first call with that shape: the first call costs a capture, later ones a replay)."""
        ids = torch.as_tensor(token_ids, device=self.device).reshape(1, -1)
        if not self.use_cuda_graphs:
            return self.forward_eager(ids, start)
        key = (start, ids.shape[-1], self.contiguous_kv, self.attention, self.split_chunk)
        entry = self._graphs.get(key)
        if entry is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.graph_after:
                return self.forward_eager(ids, start)
            entry = self._capture(ids, start)
            self._graphs[key] = entry
        entry.input_ids.copy_(ids)
        entry.graph.replay()
        return entry.logits

    def _capture(self, ids: torch.Tensor, start: int) -> _Graph:
        static_ids = ids.clone()
        saved = self.kv[start : start + ids.shape[-1]].clone()  # warm-up runs write there; keep it intact
        stream: Any = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, cuBLAS workspaces)
                self.forward_eager(static_ids, start)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.forward_eager(static_ids, start)
        self.kv[start : start + ids.shape[-1]].copy_(saved)
        return _Graph(graph=graph, input_ids=static_ids, logits=logits)
