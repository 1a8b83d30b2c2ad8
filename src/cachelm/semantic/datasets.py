"""Labelled pair data for semantic-cache evaluation, and an on-disk cache of their embeddings.

Loaders read the files under ``DATA/`` (see /work/shared/data/MANIFEST.md for provenance):

- ``qqp/meancache_val.csv`` and ``qqp/meancache_test.csv``: MeanCache's QQP splits (``question1,question2,
  is_duplicate``); val calibrates, test evaluates.
- ``qqp/gptcache_similiar_qqp_full.json``: GPTCache's 80,854 labelled QQP pairs (``text_a, text_b, label``).
- ``stsb/sts-dev.csv`` and ``stsb/sts-test.csv``: STS-B, tab-separated, score 0–5; a pair counts as a
  paraphrase when its score is >= 4.0 ("mostly equivalent" in the STS annotation guide).

`gptcache_split` separates GPTCache's pairs into the ones the fine-tuned embedder may train on (no question
shared with MeanCache val or test, after `normalise_question`) and the rest (held out: they may only be
evaluated on).

`embed_cached` stores vectors under ``CACHE_DIR/<model>/<sha256 of the text list>.npy`` so reruns skip
the model. The file name is a digest of the exact texts, so a changed subset can never reuse stale vectors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cachelm.errors import ConfigError
from cachelm.semantic.embedder import Embedder, Vectors

STSB_PARAPHRASE_SCORE = 4.0


@dataclass(frozen=True, kw_only=True)
class PairSet:
    """Labelled text pairs: ``labels[i]`` is 1 when ``a[i]`` and ``b[i]`` ask for the same answer."""

    name: str
    a: list[str]
    b: list[str]
    labels: np.ndarray  # (n,) int8 in {0, 1}

    def __post_init__(self) -> None:
        if not (len(self.a) == len(self.b) == len(self.labels)):
            raise ConfigError(f"`{self.name}`: a, b and labels differ in length")

    def __len__(self) -> int:
        return len(self.a)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"`--data` has no file {path}")
    return path


def load_meancache(data_dir: Path, split: str) -> PairSet:
    """MeanCache's QQP split `split` ('val' or 'test')."""
    if split not in ("val", "test"):
        raise ConfigError(f"`split` must be 'val' or 'test', got {split!r}")
    path = _require(data_dir / "qqp" / f"meancache_{split}.csv")
    a: list[str] = []
    b: list[str] = []
    labels: list[int] = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            a.append(row["question1"])
            b.append(row["question2"])
            labels.append(int(row["is_duplicate"]))
    return PairSet(name=f"meancache-{split}", a=a, b=b, labels=np.asarray(labels, dtype=np.int8))


def load_gptcache(data_dir: Path, *, limit: int | None = None, seed: int = 0) -> PairSet:
    """GPTCache's labelled QQP pairs; a seeded random subset of `limit` pairs when given."""
    path = _require(data_dir / "qqp" / "gptcache_similiar_qqp_full.json")
    items = json.loads(path.read_text(encoding="utf-8"))
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return PairSet(
        name="gptcache-qqp" if limit is None else f"gptcache-qqp-{limit}",
        a=[str(x["text_a"]) for x in items],
        b=[str(x["text_b"]) for x in items],
        labels=np.asarray([int(x["label"]) for x in items], dtype=np.int8),
    )


def normalise_question(text: str) -> str:
    """Lower case, whitespace collapsed and stripped: how "the same question" is recognised across files."""
    return " ".join(text.lower().split())


@dataclass(frozen=True, kw_only=True)
class GPTCacheSplit:
    """GPTCache's pairs split by overlap with MeanCache val + test (the evaluation's QQP questions)."""

    train: PairSet  # no question in common with MeanCache val or test
    held_out: PairSet  # at least one question also in MeanCache val or test: never trained on
    meancache_questions: int  # distinct normalised questions of MeanCache val + test


def _subset(pairs: PairSet, keep: np.ndarray, name: str) -> PairSet:
    idx = np.flatnonzero(keep)
    return PairSet(
        name=name, a=[pairs.a[i] for i in idx], b=[pairs.b[i] for i in idx], labels=pairs.labels[idx]
    )


def gptcache_split(data_dir: Path) -> GPTCacheSplit:
    """All 80,854 GPTCache pairs, split into training pairs and pairs held out for evaluation.

    A pair is held out when either question (normalised) appears anywhere in MeanCache val or test: both
    files are drawn from the same QQP pool, so training on such a pair would leak evaluation questions.
    """
    seen: set[str] = set()
    for split in ("val", "test"):
        mc = load_meancache(data_dir, split)
        seen.update(normalise_question(t) for t in (*mc.a, *mc.b))
    full = load_gptcache(data_dir)
    overlap = np.asarray(
        [
            normalise_question(a) in seen or normalise_question(b) in seen
            for a, b in zip(full.a, full.b, strict=True)
        ],
        dtype=bool,
    )
    return GPTCacheSplit(
        train=_subset(full, ~overlap, "gptcache-train"),
        held_out=_subset(full, overlap, "gptcache-heldout"),
        meancache_questions=len(seen),
    )


def load_stsb(data_dir: Path, split: str) -> PairSet:
    """STS-B `split` ('dev' or 'test'); label 1 when the gold score is >= 4.0."""
    if split not in ("dev", "test"):
        raise ConfigError(f"`split` must be 'dev' or 'test', got {split!r}")
    path = _require(data_dir / "stsb" / f"sts-{split}.csv")
    a: list[str] = []
    b: list[str] = []
    labels: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")  # QUOTE_NONE: the sentences contain quote characters
        if len(cols) < 7:
            continue
        a.append(cols[5])
        b.append(cols[6])
        labels.append(int(float(cols[4]) >= STSB_PARAPHRASE_SCORE))
    return PairSet(name=f"stsb-{split}", a=a, b=b, labels=np.asarray(labels, dtype=np.int8))


def _model_folder(cache_dir: Path, model_id: str) -> Path:
    return cache_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)


def cached_vectors(cache_dir: Path, model_id: str) -> dict[str, np.ndarray]:
    """Every vector `embed_cached` has kept under `cache_dir` for `model_id`: text → vector."""
    known: dict[str, np.ndarray] = {}
    for shard in sorted(_model_folder(cache_dir, model_id).glob("*.npz")):
        with np.load(shard) as z:
            known.update(zip(z["texts"].tolist(), z["vectors"], strict=True))
    return known


def embed_cached(embedder: Embedder, texts: Sequence[str], cache_dir: Path | None) -> Vectors:
    """Vectors of `texts` in order; each distinct text is embedded once, ever, when `cache_dir` is given.

    The folder ``cache_dir/<model>/`` holds shards ``<digest>.npz`` (texts + vectors); texts missing from
    every shard are embedded and written as one new shard, atomically (an interrupted run leaves no half
    shard behind).
    """
    unique = sorted(set(texts))
    known: dict[str, np.ndarray] = {}
    folder = None
    if cache_dir is not None:
        folder = _model_folder(cache_dir, embedder.model_id)
        folder.mkdir(parents=True, exist_ok=True)
        known = cached_vectors(cache_dir, embedder.model_id)
    missing = [t for t in unique if t not in known]
    if missing:
        vectors = embedder.embed(missing)
        known.update(zip(missing, vectors, strict=True))
        if folder is not None:
            digest = hashlib.sha256("\x00".join(missing).encode()).hexdigest()[:24]
            tmp = folder / f"{digest}.tmp.npz"
            np.savez(tmp, texts=np.asarray(missing, dtype=object).astype(str), vectors=vectors)
            tmp.replace(folder / f"{digest}.npz")
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.ascontiguousarray(np.stack([known[t] for t in texts]), dtype=np.float32)


def pair_similarities(embedder: Embedder, pairs: PairSet, cache_dir: Path | None) -> np.ndarray:
    """Cosine similarity of each pair, shape (n,)."""
    vectors = embed_cached(embedder, [*pairs.a, *pairs.b], cache_dir)  # (2n, dim)
    n = len(pairs)
    return np.asarray(np.einsum("ij,ij->i", vectors[:n], vectors[n:]), dtype=np.float64)
