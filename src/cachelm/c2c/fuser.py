"""The C2C fuser: per fused receiver layer, a K projector and a V projector plus one learnable gate.

For a receiver layer `l` paired with sharer layer `m` (config.layer_map), and X in {K, V}::

    x   = [norm(X_r) ; norm(X_s aligned)]          # (B, T, Hr*Dr + Hs*Ds), heads flattened
    p   = MLP(x)                                    # (B, T, Hr*Dr) -> (B, Hr, T, Dr)
    w   = sigmoid(Linear(x))                        # (B, T, Hr)    -> (B, Hr, T, 1), per token, per head
    X_r' = X_r + g_l * w * p

`g_l` is a Gumbel-sigmoid of the layer's gate logit with temperature τ while training (annealed by the
trainer) and a hard 0/1 (logit > 0) at inference. A closed gate returns the receiver's tensor object itself,
so a fuser with every gate closed reproduces the receiver bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cachelm.c2c.config import FuserConfig
from cachelm.errors import ConfigError

KV = tuple[torch.Tensor, torch.Tensor]


def _rms(x: torch.Tensor) -> torch.Tensor:
    # Without learned scale: the two models' K/V magnitudes differ by orders (Gemma normalises K, Llama
    # does not), and the MLP should see both on one scale.
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class KVProjector(nn.Module):
    """Projects (receiver X, aligned sharer X) to a weighted residual for the receiver's X (K or V)."""

    def __init__(self, receiver_dim: int, sharer_dim: int, num_heads: int, hidden_dim: int, mlp_layers: int):
        super().__init__()
        self.num_heads = num_heads
        in_dim = receiver_dim + sharer_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(mlp_layers):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        out = nn.Linear(width, receiver_dim)
        # Zero output layer: an untrained fuser adds nothing, so training starts from the receiver alone.
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*layers, out)
        self.weight_head = nn.Linear(in_dim, num_heads)

    def forward(self, receiver: torch.Tensor, sharer: torch.Tensor) -> torch.Tensor:
        """`receiver` (B, Hr, T, Dr), `sharer` (B, T, Hs*Ds) → residual (B, Hr, T, Dr), float32."""
        b, h, t, d = receiver.shape
        rec = receiver.float().transpose(1, 2).reshape(b, t, h * d)  # (B, T, Hr*Dr)
        x = torch.cat([_rms(rec), _rms(sharer.float())], dim=-1)  # (B, T, Hr*Dr + Hs*Ds)
        proj: torch.Tensor = self.mlp(x).view(b, t, h, d).transpose(1, 2)  # (B, Hr, T, Dr)
        weight = torch.sigmoid(self.weight_head(x)).transpose(1, 2).unsqueeze(-1)  # (B, Hr, T, 1)
        return weight * proj


class C2CFuser(nn.Module):
    """All projectors and gates of one (receiver, sharer) pair; parameters stay float32."""

    def __init__(self, config: FuserConfig):
        super().__init__()
        self.config = config
        r, s = config.receiver, config.sharer

        def make() -> KVProjector:
            return KVProjector(r.kv_dim, s.kv_dim, r.num_kv_heads, config.hidden_dim, config.mlp_layers)

        self.key_projectors = nn.ModuleList(make() for _ in config.layer_map)
        self.value_projectors = nn.ModuleList(make() for _ in config.layer_map)
        self.gate_logits = nn.Parameter(torch.full((len(config.layer_map),), float(config.gate_init)))
        self.temperature = 1.0  # set by the trainer; used only in training mode

    def gates(self) -> torch.Tensor:
        """Gate per fused layer (n,): Gumbel-sigmoid samples in training mode, hard 0/1 in eval mode."""
        if not self.training:
            return (self.gate_logits > 0).to(self.gate_logits.dtype)
        u = torch.rand_like(self.gate_logits).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)  # logistic noise = difference of two Gumbels
        return torch.sigmoid((self.gate_logits + noise) / self.temperature)

    def num_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Size of the parameters when stored as `dtype`."""
        return sum(p.numel() for p in self.parameters()) * torch.empty((), dtype=dtype).element_size()

    def fuse(
        self,
        receiver: Sequence[KV],
        sharer: Sequence[KV],
        alignment: torch.Tensor,
        *,
        receiver_mask: torch.Tensor | None = None,
        sharer_mask: torch.Tensor | None = None,
    ) -> list[KV]:
        """The receiver's cache with the sharer's projected in.

        `receiver`: per receiver layer (K, V), each (B, Hr, T, Dr). `sharer`: per sharer layer (K, V), each
        (B, Hs, S, Ds). `alignment`: (B, T, S), rows summing to 1 (align.py), mapping sharer tokens onto
        receiver tokens. `receiver_mask` (B, T) / `sharer_mask` (B, S): 1 for real tokens, 0 for padding;
        padded receiver positions keep their own K/V and padded sharer positions contribute nothing
        (whatever a model wrote there, even NaN). Returns per receiver layer (K, V) in the receiver's
        dtype; unfused layers and layers whose gate is closed are the receiver's own tensors.
        """
        cfg = self.config
        if len(receiver) != cfg.receiver.num_layers or len(sharer) != cfg.sharer.num_layers:
            raise ConfigError(
                f"fuser expects {cfg.receiver.num_layers} receiver and {cfg.sharer.num_layers} sharer "
                "layers, "
                f"got {len(receiver)} and {len(sharer)}"
            )
        out = list(receiver)
        gates = self.gates()
        for i, (r_layer, s_layer) in enumerate(self.config.layer_map):
            if not self.training and float(gates[i]) == 0.0:
                continue
            aligned = self.align_sharer(sharer[s_layer], alignment, sharer_mask)
            out[r_layer] = self.fuse_layer(i, receiver[r_layer], aligned, gates[i], receiver_mask)
        return out

    @staticmethod
    def align_sharer(sharer: KV, alignment: torch.Tensor, sharer_mask: torch.Tensor | None = None) -> KV:
        """One sharer layer's (K, V), each (B, Hs, S, Ds), read through `alignment` (B, T, S): per receiver
        token, heads flattened — (B, T, Hs*Ds) each, float32. Positions where `sharer_mask` (B, S) is 0 are
        zeroed first: an alignment weight of 0 does not cancel a NaN (0 · NaN = NaN)."""
        out = []
        for x in sharer:
            b, hs, s, ds = x.shape
            flat = x.float().transpose(1, 2).reshape(b, s, hs * ds)  # (B, S, Hs*Ds)
            if sharer_mask is not None:
                flat = flat.masked_fill(sharer_mask[:, :, None] == 0, 0.0)
            out.append(torch.bmm(alignment.float(), flat))  # (B, T, Hs*Ds)
        return out[0], out[1]

    def fuse_layer(
        self, index: int, receiver: KV, aligned: KV, gate: torch.Tensor, mask: torch.Tensor | None = None
    ) -> KV:
        """Fused (K, V) of the `index`-th pair of the layer map: `receiver` (K, V) each (B, Hr, T, Dr),
        `aligned` sharer (K, V) each (B, T, Hs*Ds), `gate` this layer's gate value, `mask` (B, T) 0 where
        the receiver position is padding (left unchanged)."""
        fused: list[torch.Tensor] = []
        for rec, sh, projector in (
            (receiver[0], aligned[0], self.key_projectors[index]),
            (receiver[1], aligned[1], self.value_projectors[index]),
        ):
            delta = projector(rec, sh)  # (B, Hr, T, Dr)
            if mask is not None:
                delta = delta.masked_fill(mask[:, None, :, None] == 0, 0.0)
            fused.append((rec.float() + gate * delta).to(rec.dtype))
        return fused[0], fused[1]
