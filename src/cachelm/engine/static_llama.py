"""A lean suffix prefill for Llama-architecture models over a static, token-major KV buffer, CUDA-graphed.

Why: on a hit only the suffix is computed (e.g. 64 tokens). For an 8B model that is ~5 ms of weight reads
on an H100, but HF eager spends ~50 ms of per-call Python and kernel-launch overhead on it (measured in
../shared/gpu/README.md). This runner removes that overhead:

- the KV lives in one static buffer ``(max_tokens, L, 2, H, D)`` — the block layout of `cachelm.kv` — so a
  prefix hit decodes its blocks straight into the buffer (no per-layer restore copies);
- the forward is the Llama decoder written out with the model's own modules (no cache objects, no mask
  builders, no output recorders);
- on CUDA, each (prefix length, suffix length) gets a CUDA graph captured once and replayed after, so a call
  is one graph launch.

Scope: Llama-architecture causal LMs (Llama, SmolLM2) with default or scaled rope; no sliding windows.
`forward_eager` is the same math without a graph; tests check it against HF on CPU.
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


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # (1, S) static input
    logits: torch.Tensor  # (V,) static output


class StaticLlamaRunner:
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
    ) -> None:
        """`graph_after`: calls with one (start, length) shape before a graph is captured for it (earlier
        calls run the same math ungraphed), so one-off shapes do not pay a capture.

        `attention`: "sdpa" (one masked SDPA call per layer) or "split" (split-KV: the prefix keys, which
        every suffix query sees, go in chunks of `split_chunk` through the flash kernel with their
        log-sum-exp, the suffix keys through a small masked softmax, and the parts are merged). With 64
        queries and 8K keys a single attention call keeps only a few dozen thread blocks busy; splitting
        the keys is what flash-decoding does for the same reason."""
        if model.config.model_type not in ("llama",):
            raise ConfigError(f"`model` must be a Llama-architecture model, got {model.config.model_type!r}")
        self.layout = KVLayout.from_model(model)
        if any(w is not None for w in self.layout.sliding_windows):
            raise ConfigError(
                "`model` has sliding-window layers; StaticLlamaRunner supports full attention only"
            )
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ConfigError(f"`max_tokens` must be an int > 0, got {max_tokens!r}")
        self.model = model
        self.device = torch.device(model.device)
        self.max_tokens = max_tokens
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        # Copy each layer's K/V head-major before attention (costs a read+write of the prefix KV per call;
        # only worth it where the attention kernel would otherwise reject the token-major strides).
        self.contiguous_kv = contiguous_kv
        if attention not in ("sdpa", "split"):
            raise ConfigError(f"`attention` must be 'sdpa' or 'split', got {attention!r}")
        if isinstance(split_chunk, bool) or not isinstance(split_chunk, int) or split_chunk <= 0:
            raise ConfigError(f"`split_chunk` must be an int > 0, got {split_chunk!r}")
        self.attention = attention
        self.split_chunk = split_chunk
        self.kv = torch.zeros(self.layout.block_shape(max_tokens), dtype=model.dtype, device=self.device)
        self._graphs: dict[tuple[int, int, bool, str], _Graph] = {}
        self._seen: dict[tuple[int, int, bool, str], int] = {}
        self.graph_after = max(1, graph_after)
        inner = model.model
        self._embed, self._layers, self._norm = inner.embed_tokens, inner.layers, inner.norm
        self._rotary, self._lm_head = inner.rotary_emb, model.lm_head
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._apply_rope = apply_rotary_pos_emb

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
        h = self._embed(input_ids)  # (1, S, d)
        cos, sin = self._rotary(h, positions)  # (1, S, D) each
        for i, layer in enumerate(self._layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, num_new, n_heads, head_dim).transpose(1, 2)  # (1, Hq, S, D)
            k = attn.k_proj(x).view(1, num_new, kv_heads, head_dim).transpose(1, 2)  # (1, H, S, D)
            v = attn.v_proj(x).view(1, num_new, kv_heads, head_dim)  # (1, S, H, D)
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
            if self.attention == "split":
                o = self._split_attention(q, i, start, end, mask_g[:, start:], attn.scaling)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_g, scale=attn.scaling)
            o = o.reshape(1, n_heads, num_new, head_dim)  # (1, Hq, S, D)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, num_new, n_heads * head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = self._norm(h[:, -1:])  # (1, 1, d)
        logits: torch.Tensor = self._lm_head(last)[0, -1].float()  # (V,)
        return logits

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
        key = (start, ids.shape[-1], self.contiguous_kv, self.attention)
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
