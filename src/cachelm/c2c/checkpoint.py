"""Fuser checkpoints: safetensors with metadata that ties them to one (receiver, sharer) pair.

Metadata keys (all strings, as safetensors requires):
  format            "cachelm-c2c-fuser/2" (format 1: the same without a checksum)
  config            FuserConfig JSON (shapes, layer map, alignment, size)
  receiver, sharer  model fingerprints (see `model_fingerprint`)
  receiver_file_sha256, sharer_file_sha256   SHA-256 of the GGUF/weights file when known (else "")
  train             free-form JSON about the training run (data, steps, loss)
  xxh3_128          XXH3-128 (hex) of the tensors' names, shapes, dtypes and bytes in name order
                    (`cachelm.kv.codecs.checksum`, as KV blocks on disk; the key names the algorithm),
                    and of every metadata field above (`checkpoint_digest`)

A fingerprint identifies the *weights and tokenizer*, not a path: it hashes the architecture, the KV shape,
the tokenizer vocabulary and a fixed sample of every parameter rounded to bfloat16 (so the same GGUF
loaded as float32 on a CPU or bfloat16 on a GPU gives the same fingerprint). Loading a checkpoint into a
different pair raises CheckpointError naming the side that differs.

The checksum guards the tensor bytes and the metadata against corruption (bit rot, a bad copy: a digit
changed in the config's layer map would parse and fit, and fuse the wrong layers), not against an attacker,
who could recompute it. Rule for a checkpoint without one: format 1 predates checksums and loads unverified
(the committed checkpoints are format 1); a format-2 checkpoint without one is refused. A checksum that is
present is always verified, in either format; a mismatch (damaged tensors or metadata, or a garbled field) is
a CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cachelm.c2c.config import FuserConfig, ModelShape
from cachelm.c2c.fuser import C2CFuser
from cachelm.errors import CheckpointError, ConfigError
from cachelm.kv.codecs import CHECKSUMS, checksum

FORMAT = "cachelm-c2c-fuser/2"
LEGACY_FORMAT = "cachelm-c2c-fuser/1"  # written before checksums: loads without one
_SAMPLE = 256  # parameter values hashed per tensor: enough to tell models apart, cheap for large ones
_COVERED = ("format", "config", "receiver", "sharer", "receiver_file_sha256", "sharer_file_sha256", "train")


def model_fingerprint(model: Any, tokenizer: Any) -> str:
    """SHA-256 (hex) identifying `model`'s architecture, KV shape, tokenizer vocabulary and weights."""
    h = hashlib.sha256()
    shape = ModelShape.of(model.config)
    h.update(f"{type(model).__name__}|{shape.num_layers}|{shape.num_kv_heads}|{shape.head_dim}".encode())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    with torch.no_grad():
        for name, param in sorted(model.state_dict().items()):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].to("cpu", torch.bfloat16).to(torch.float32)
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], algorithm: str = CHECKSUMS[0]
) -> str:
    """The checksum of a checkpoint: its tensors as stored and its metadata fields (absent ones as null).
    The metadata is hashed as one more byte tensor, under a name no parameter can have."""
    covered = json.dumps({key: meta.get(key) for key in _COVERED}, sort_keys=True).encode()
    extra = torch.frombuffer(bytearray(covered), dtype=torch.uint8)
    return checksum({**tensors, "\x00metadata": extra}, algorithm)


def save_fuser(
    fuser: C2CFuser,
    path: str | Path,
    *,
    receiver_fingerprint: str,
    sharer_fingerprint: str,
    receiver_file_sha256: str = "",
    sharer_file_sha256: str = "",
    train_info: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write `fuser` to `path` (safetensors, parameters as `dtype`) with the identifying metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in fuser.state_dict().items()}
    # Gate logits decide hard 0/1 at inference; keep them exact.
    tensors["gate_logits"] = fuser.gate_logits.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format": FORMAT,
        "config": fuser.config.to_json(),
        "receiver": receiver_fingerprint,
        "sharer": sharer_fingerprint,
        "receiver_file_sha256": receiver_file_sha256,
        "sharer_file_sha256": sharer_file_sha256,
        "train": json.dumps(train_info or {}, sort_keys=True),
    }
    metadata[CHECKSUMS[0]] = checkpoint_digest(tensors, metadata, CHECKSUMS[0])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)  # atomic: a crash never leaves a truncated checkpoint under the final name
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a fuser checkpoint; CheckpointError if it is not one."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`path` {str(p)!r} is not a file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"{str(p)!r} is not a safetensors file: {exc}") from exc
    if meta.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"{str(p)!r} is not a C2C fuser checkpoint (format {meta.get('format')!r})")
    # Callers index these keys and parse `train`: a damaged header must fail here, as a CheckpointError.
    missing = [key for key in ("config", "receiver", "sharer") if key not in meta]
    if missing:
        raise CheckpointError(f"fuser checkpoint {str(p)!r} lacks metadata {missing}")
    # Without this a stripped checksum field would pass a damaged format-2 file as unverified.
    if meta["format"] == FORMAT and not any(a in meta for a in CHECKSUMS):
        raise CheckpointError(f"fuser checkpoint {str(p)!r} lacks a checksum (one of {list(CHECKSUMS)})")
    try:
        train = json.loads(meta.get("train", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"fuser checkpoint {str(p)!r} has malformed `train` metadata: {exc}") from exc
    if not isinstance(train, dict):
        raise CheckpointError(f"fuser checkpoint {str(p)!r} has `train` metadata that is not a JSON object")
    return meta


def verify_checksum(path: str | Path, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Check `tensors` (as stored, before any dtype change) and `meta`, the metadata `read_metadata` returned
    for `path`, against every checksum in `meta`; CheckpointError naming `path` on a mismatch. A format-1
    checkpoint carries none and passes unchecked (`read_metadata` refuses a format-2 one without).
    """
    for algorithm in (a for a in CHECKSUMS if a in meta):
        if checkpoint_digest(tensors, meta, algorithm) != meta[algorithm]:
            raise CheckpointError(
                f"fuser checkpoint {str(path)!r} failed its {algorithm} checksum: "
                "its tensor bytes, its metadata or the checksum field are damaged"
            )


def load_fuser(
    path: str | Path,
    *,
    receiver_fingerprint: str,
    sharer_fingerprint: str,
    device: str | torch.device = "cpu",
) -> C2CFuser:
    """Rebuild the fuser stored at `path` (eval mode, float32) after checking it belongs to this pair.

    Raises CheckpointError when the stored receiver or sharer fingerprint differs from the one given, or the
    tensors fail the checkpoint's checksum (`verify_checksum`).
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    for side, given in (("receiver", receiver_fingerprint), ("sharer", sharer_fingerprint)):
        if meta.get(side) != given:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was trained for {side} {meta.get(side, '')[:16]}…, "
                f"but the {side} given is {given[:16]}…"
            )
    try:
        config = FuserConfig.from_json(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed fuser config: {exc}") from exc
    fuser = C2CFuser(config)
    stored = load_file(str(path))
    verify_checksum(path, meta, stored)
    state = {k: v.float() for k, v in stored.items()}
    try:
        fuser.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own config: {exc}") from exc
    fuser.to(device)
    fuser.eval()
    return fuser
