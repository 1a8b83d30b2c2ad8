"""Codecs for stored KV blocks: raw (model dtype, fp16, bf16), int8 and int4 (KIVI-style), plus bytes I/O.

A block is ``(T, L, 2, H, D)`` (see `cachelm.kv.layout`). Quantised codecs follow KIVI (Liu et al., 2024):

- keys are quantised **per channel**: for every (layer, head, channel) one scale over a group of tokens
  (the whole block by default), because key outliers live in fixed channels;
- values are quantised **per token**: for every (token, layer, head) one scale over a group of channels.

int4 is asymmetric (scale and minimum, fp16) with two codes packed per byte along the channel axis. int8 is
symmetric (one fp16 scale per group): at 8 bits a zero point buys no measurable accuracy and dropping it is
what brings the size ratio against fp16 above 1.9×.

Size per element against fp16 (2 bytes), block of T tokens, value group G: int4 ``0.5 + (4/T + 4/G) / 2``
bytes, so T = G = 64 gives 3.56×; int8 ``1 + (2/T + 2/G) / 2`` bytes, 1.94× at T = G = 64.

Group sizes are not stored: the decoder reads them from the scale tensors' shapes. A block the fp16 scales
cannot describe (a value beyond ±65504, inf or nan) is stored raw by the quantised codecs (see `encode`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from cachelm.errors import ConfigError, IntegrityError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"`dtype` must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


# A block's owner: the hex tag of the tenant it was computed for (`prefix_cache.owner_tag`). Disk tiers put it
# in file names, so nothing else is accepted.
_OWNER = re.compile(r"[0-9a-f]{1,64}")


def check_owner(owner: str, *, empty: bool) -> None:
    """ConfigError unless `owner` is a tenant tag (or "" where `empty` allows a block without one)."""
    if not isinstance(owner, str) or not ((empty and owner == "") or _OWNER.fullmatch(owner)):
        raise ConfigError(f"a block's `owner` must be 1-64 lowercase hex digits, got {owner!r:.80}")


@dataclass(frozen=True, kw_only=True)
class EncodedBlock:
    """One KV block as a codec stored it: named tensors plus what is needed to decode them."""

    codec: str
    num_tokens: int
    dtype: torch.dtype  # dtype of the decoded block
    tensors: Mapping[str, torch.Tensor]
    owner: str = ""  # the tenant it was computed for (`prefix_cache.owner_tag`), "" when not known

    def __post_init__(self) -> None:
        check_owner(self.owner, empty=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(
        self, device: torch.device | str, *, pin: bool = False, non_blocking: bool = False
    ) -> EncodedBlock:
        """A copy on `device` (pinned host memory with `pin`); self when nothing would change."""
        target = torch.device(device)
        if all(t.device == target and (not pin or t.is_pinned()) for t in self.tensors.values()):
            return self
        moved: dict[str, torch.Tensor] = {}
        for name, t in self.tensors.items():
            out = t.to(target, non_blocking=non_blocking)
            if pin and target.type == "cpu" and torch.cuda.is_available() and not out.is_pinned():
                out = out.pin_memory()
            moved[name] = out
        return replace(self, tensors=moved)


class Codec(Protocol):
    """Turns a block ``(T, L, 2, H, D)`` into an `EncodedBlock` and back."""

    name: str
    lossless: bool

    def encode(self, block: torch.Tensor) -> EncodedBlock: ...

    def decode(
        self,
        encoded: EncodedBlock,
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block ``(T, L, 2, H, D)`` on `device` (or written into `out`, which is returned)."""
        ...


def _check_block(block: torch.Tensor) -> None:
    if not isinstance(block, torch.Tensor) or block.dim() != 5 or block.shape[2] != 2:
        shape = tuple(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
        raise ConfigError(f"`block` must be a tensor of shape (T, L, 2, H, D), got {shape}")


class RawCodec:
    """Stores the block as is (`dtype` None) or cast to float16 / bfloat16. Lossless when not cast."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ConfigError(f"`dtype` must be None, float16, bfloat16 or float32, got {dtype!r}")
        self.store_dtype = dtype
        self.name = "raw" if dtype is None else dtype_name(dtype)
        self.lossless = dtype is None

    def encode(self, block: torch.Tensor) -> EncodedBlock:
        _check_block(block)
        data = block if self.store_dtype is None else block.to(self.store_dtype)
        return EncodedBlock(
            codec=self.name, num_tokens=block.shape[0], dtype=block.dtype, tensors={"kv": data}
        )

    def decode(
        self,
        encoded: EncodedBlock,
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv = encoded.tensors["kv"]
        if out is not None:
            return out.copy_(kv, non_blocking=True)  # one copy, straight from (pinned) host memory
        return kv.to(device=device or kv.device, dtype=encoded.dtype, non_blocking=True)


class _GroupedCodec:
    """Shared grouping logic of the quantised codecs (see the module docstring)."""

    bits: int
    max_abs: float  # the largest |value| whose group statistics fp16 still holds

    def __init__(self, *, key_group: int = 64, value_group: int = 64) -> None:
        for arg, value in (("key_group", key_group), ("value_group", value_group)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"`{arg}` must be an int > 0, got {value!r}")
        self.key_group = key_group
        self.value_group = value_group
        self.name = f"int{self.bits}"
        self.lossless = False

    def _groups(self, block: torch.Tensor) -> tuple[int, int]:
        t, d = block.shape[0], block.shape[-1]
        gk = self.key_group if t % self.key_group == 0 else t  # a block shorter than the group: one group
        gv = self.value_group if d % self.value_group == 0 else d
        return gk, gv

    def encode(self, block: torch.Tensor) -> EncodedBlock:
        _check_block(block)
        gk, gv = self._groups(block)
        x = block.float()
        # The scales (and int4 minima) are fp16: beyond `max_abs` they overflow, and one inf or nan poisons
        # its whole group (a key channel over every token of the block) — nan where recompute is finite.
        # Such blocks are rare: store them raw (exact; `codec_for` decodes by the block's codec name).
        if x.numel() and not bool(x.abs().amax() <= self.max_abs):
            return RawCodec().encode(block)
        t, n_layers, _, h, d = x.shape
        keys = x[:, :, 0].reshape(t // gk, gk, n_layers, h, d)  # (G, gk, L, H, D): per-channel groups
        values = x[:, :, 1].reshape(t, n_layers, h, d // gv, gv)  # (T, L, H, D/gv, gv): per-token groups
        qk, *k_stats = self._quantise(keys, dim=1)
        qv, *v_stats = self._quantise(values, dim=-1)
        tensors = {
            "qk": self._pack(qk.reshape(t, n_layers, h, d)),
            "qv": self._pack(qv.reshape(t, n_layers, h, d)),
        }
        for name, stat in zip(self._stat_names, k_stats, strict=True):
            tensors[f"k_{name}"] = stat.squeeze(1).half()  # (G, L, H, D)
        for name, stat in zip(self._stat_names, v_stats, strict=True):
            tensors[f"v_{name}"] = stat.squeeze(-1).half()  # (T, L, H, D/gv)
        return EncodedBlock(codec=self.name, num_tokens=t, dtype=block.dtype, tensors=tensors)

    def decode(
        self,
        encoded: EncodedBlock,
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoded.codec != self.name:  # a block `encode` kept raw
            return codec_for(encoded).decode(encoded, device=device, out=out)
        if out is not None:
            device = out.device
        dev = torch.device(device) if device is not None else encoded.device
        # Move the compact codes first: a host→device hit copies the compressed bytes, not the decoded ones.
        ts = {name: t.to(dev, non_blocking=True) for name, t in encoded.tensors.items()}
        qk, qv = self._unpack(ts["qk"]), self._unpack(ts["qv"])  # (T, L, H, D)
        t, n_layers, h, d = qk.shape
        groups_k = ts[f"k_{self._stat_names[0]}"].shape[0]
        gk = t // groups_k
        gv = d // ts[f"v_{self._stat_names[0]}"].shape[-1]
        k_stats = [ts[f"k_{n}"].float().unsqueeze(1) for n in self._stat_names]
        v_stats = [ts[f"v_{n}"].float().unsqueeze(-1) for n in self._stat_names]
        keys = self._dequantise(qk.reshape(groups_k, gk, n_layers, h, d), k_stats).reshape(t, n_layers, h, d)
        values = self._dequantise(qv.reshape(t, n_layers, h, d // gv, gv), v_stats).reshape(t, n_layers, h, d)
        block = torch.stack([keys, values], dim=2).to(encoded.dtype)  # (T, L, 2, H, D)
        return out.copy_(block) if out is not None else block

    _stat_names: tuple[str, ...]

    def _quantise(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _dequantise(self, q: torch.Tensor, stats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return packed


class Int8Codec(_GroupedCodec):
    """Symmetric int8: one fp16 scale per group (keys per channel, values per token)."""

    bits = 8
    max_abs = 65504.0 * 127  # scale = max |x| / 127
    _stat_names = ("scale",)

    def _quantise(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
        scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / 127.0
        scale = scale.half().float()  # quantise against the scale the decoder will read back
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def _dequantise(self, q: torch.Tensor, stats: list[torch.Tensor]) -> torch.Tensor:
        return q.float() * stats[0]


class Int4Codec(_GroupedCodec):
    """Asymmetric int4: fp16 scale and minimum per group, two codes per byte along the channel axis."""

    bits = 4
    max_abs = 65504.0  # the minimum itself is fp16; (max - min) / 15 stays far below the limit
    _stat_names = ("scale", "min")

    def _quantise(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
        lo = x.amin(dim=dim, keepdim=True).half().float()
        hi = x.amax(dim=dim, keepdim=True)
        scale = ((hi - lo).clamp_min(1e-8) / 15.0).half().float()
        q = torch.round((x - lo) / scale).clamp_(0, 15).to(torch.uint8)
        return q, scale, lo

    def _dequantise(self, q: torch.Tensor, stats: list[torch.Tensor]) -> torch.Tensor:
        scale, lo = stats
        return q.float() * scale + lo

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if q.shape[-1] % 2:
            raise ConfigError(f"int4 packing needs an even head dim, got {q.shape[-1]}")
        return q[..., 0::2] | (q[..., 1::2] << 4)  # (..., D/2) uint8

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        low, high = packed & 0x0F, packed >> 4
        return torch.stack([low, high], dim=-1).flatten(-2)  # (..., D)


def codec_for(encoded: EncodedBlock) -> Codec:
    """The codec that decodes `encoded` (group sizes are read from its tensors, so defaults suffice)."""
    return make_codec(encoded.codec)


def make_codec(name: str) -> Codec:
    """A codec by name: "raw", "float16", "bfloat16", "int8" or "int4" (default group sizes)."""
    if name == "raw":
        return RawCodec()
    if name in ("float16", "fp16"):
        return RawCodec(torch.float16)
    if name in ("bfloat16", "bf16"):
        return RawCodec(torch.bfloat16)
    if name == "int8":
        return Int8Codec()
    if name == "int4":
        return Int4Codec()
    raise ConfigError(f"`codec` must be one of raw, float16, bfloat16, int8, int4; got {name!r}")


# ---- bytes I/O (disk and Redis tiers) -------------------------------------------------------------------


# The digests a stored block may carry in its metadata (the key names the algorithm). Writers use the first;
# readers accept both: blocks stored before 2026-12-07 carry SHA-256. The digest guards against corruption
# (torn writes, bit rot, a truncated value), not against an attacker, who could recompute either one; sealed
# tiers (`Keyring`) authenticate every byte with AES-GCM. XXH3-128 runs at memory speed where SHA-256 was
# the largest stage of a disk hit (BENCHMARKS.md `kv-disk-breakdown-cpu`).
CHECKSUMS = ("xxh3_128", "sha256")


def checksum(tensors: Mapping[str, torch.Tensor], algorithm: str = CHECKSUMS[0]) -> str:
    """A digest (`algorithm`, one of CHECKSUMS) over the tensors' names, shapes, dtypes and bytes, in name
    order."""
    if algorithm not in CHECKSUMS:
        raise ConfigError(f"`algorithm` must be one of {CHECKSUMS}, got {algorithm!r}")
    if algorithm == "sha256":
        h: Any = hashlib.sha256()
    else:
        import xxhash  # only where blocks become bytes: memory tiers run without it

        h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, list(t.shape), dtype_name(t.dtype)]).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)  # a view of the bytes, not a copy
    return str(h.hexdigest())


def to_bytes(encoded: EncodedBlock) -> bytes:
    """Serialise as a safetensors file whose metadata carries the codec, dtype, token count and checksum."""
    from safetensors.torch import save

    tensors = {name: t.detach().contiguous().cpu() for name, t in encoded.tensors.items()}
    metadata = {
        "codec": encoded.codec,
        "dtype": dtype_name(encoded.dtype),
        "num_tokens": str(encoded.num_tokens),
        CHECKSUMS[0]: checksum(tensors, CHECKSUMS[0]),
    }
    if encoded.owner:
        metadata["owner"] = encoded.owner
    return bytes(save(tensors, metadata=metadata))


# safetensors dtype codes of the tensors the codecs store (raw model dtypes, int8 and packed int4 codes)
_STORED_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def from_bytes(data: bytes | bytearray, *, authenticated: bool = False) -> EncodedBlock:
    """Parse `to_bytes` output; IntegrityError when it is truncated, malformed or fails its checksum.

    The tensors are views of `data` (no copy) when it is a bytearray, which the caller then hands over;
    immutable bytes are copied once into a bytearray first. `authenticated`: `data` was just opened from
    an AES-GCM envelope, whose tag already proved every byte unchanged, so the checksum is not recomputed.
    """
    buf = data if isinstance(data, bytearray) else bytearray(data)
    try:
        header_len = int.from_bytes(buf[:8], "little")
        header = json.loads(bytes(buf[8 : 8 + header_len]))
        metadata = header.pop("__metadata__", {})
        tensors = {name: _view(buf, 8 + header_len, entry) for name, entry in header.items()}
        codec, dtype = metadata["codec"], parse_dtype(metadata["dtype"])
        num_tokens = int(metadata["num_tokens"])
        algorithm = next((a for a in CHECKSUMS if a in metadata), None)
        if algorithm is None:
            raise ValueError(f"no checksum (one of {CHECKSUMS}) in the metadata")
        expected = metadata[algorithm]
        block = EncodedBlock(
            codec=codec, num_tokens=num_tokens, dtype=dtype, tensors=tensors, owner=metadata.get("owner", "")
        )
    except Exception as exc:  # json, key, type and value errors of a damaged header alike
        raise IntegrityError(f"stored KV block is malformed: {exc}") from exc
    if not authenticated and checksum(tensors, algorithm) != expected:
        raise IntegrityError("stored KV block failed its checksum")
    return block


def _view(buf: bytearray, data_start: int, entry: dict[str, Any]) -> torch.Tensor:
    """One tensor of a safetensors header entry, as a view of `buf` (a copy where its offset is not
    aligned to its dtype); ValueError when it does not fit."""
    dtype = _STORED_DTYPES[entry["dtype"]]
    shape = [int(n) for n in entry["shape"]]
    begin, end = (int(n) for n in entry["data_offsets"])
    itemsize, numel = dtype.itemsize, math.prod(shape)
    if min(shape, default=0) < 0 or not 0 <= begin <= end or data_start + end > len(buf):
        raise ValueError(f"tensor bounds {begin}..{end} outside the {len(buf)}-byte block")
    if end - begin != numel * itemsize:
        raise ValueError(f"tensor of shape {shape} does not fill its {end - begin} bytes")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
    if flat.data_ptr() % itemsize:  # a view must start on a multiple of its element size
        flat = flat.clone()
    return flat.view(dtype).view(shape)
