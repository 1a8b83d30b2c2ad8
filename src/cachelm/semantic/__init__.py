"""Semantic layer: embedder, embedding cache, vector indexes, decision rules, the semantic cache, evaluation.

See docs/SEMANTIC.md for the design and the statistics of the δ-bounded decision rule.

Names are re-exported lazily (as in `cachelm.engine`): importing one submodule — the checkpoint format or
the fine-tuning code on a bare GPU host, say — must not pull in the serving stack (`cachelm.keys` needs
orjson) or the index libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the static view of the lazy exports below
    from cachelm.semantic.cache import Candidate, SemanticCache, SemanticHit, SemanticLookup, SemanticStats
    from cachelm.semantic.decision import (
        BoundedErrorConfig,
        BoundedErrorPolicy,
        Calibration,
        Decision,
        DecisionRule,
        StaticThreshold,
        calibrate_threshold,
    )
    from cachelm.semantic.embedder import Embedder, HashingEmbedder, MiniLMEmbedder
    from cachelm.semantic.embedding_cache import EmbeddingBatch, EmbeddingCache, embedding_key
    from cachelm.semantic.hnsw import HNSWConfig, HNSWIndex
    from cachelm.semantic.index import FlatIndex, IndexEntry, Neighbor, VectorIndex
    from cachelm.semantic.pgvector import PgVectorIndex

_EXPORTS = {
    "BoundedErrorConfig": "cachelm.semantic.decision",
    "BoundedErrorPolicy": "cachelm.semantic.decision",
    "Calibration": "cachelm.semantic.decision",
    "Candidate": "cachelm.semantic.cache",
    "Decision": "cachelm.semantic.decision",
    "DecisionRule": "cachelm.semantic.decision",
    "Embedder": "cachelm.semantic.embedder",
    "EmbeddingBatch": "cachelm.semantic.embedding_cache",
    "EmbeddingCache": "cachelm.semantic.embedding_cache",
    "FlatIndex": "cachelm.semantic.index",
    "HNSWConfig": "cachelm.semantic.hnsw",
    "HNSWIndex": "cachelm.semantic.hnsw",
    "HashingEmbedder": "cachelm.semantic.embedder",
    "IndexEntry": "cachelm.semantic.index",
    "MiniLMEmbedder": "cachelm.semantic.embedder",
    "Neighbor": "cachelm.semantic.index",
    "PgVectorIndex": "cachelm.semantic.pgvector",
    "SemanticCache": "cachelm.semantic.cache",
    "SemanticHit": "cachelm.semantic.cache",
    "SemanticLookup": "cachelm.semantic.cache",
    "SemanticStats": "cachelm.semantic.cache",
    "StaticThreshold": "cachelm.semantic.decision",
    "VectorIndex": "cachelm.semantic.index",
    "calibrate_threshold": "cachelm.semantic.decision",
    "embedding_key": "cachelm.semantic.embedding_cache",
}

__all__ = [
    "BoundedErrorConfig",
    "BoundedErrorPolicy",
    "Calibration",
    "Candidate",
    "Decision",
    "DecisionRule",
    "Embedder",
    "EmbeddingBatch",
    "EmbeddingCache",
    "FlatIndex",
    "HNSWConfig",
    "HNSWIndex",
    "HashingEmbedder",
    "IndexEntry",
    "MiniLMEmbedder",
    "Neighbor",
    "PgVectorIndex",
    "SemanticCache",
    "SemanticHit",
    "SemanticLookup",
    "SemanticStats",
    "StaticThreshold",
    "VectorIndex",
    "calibrate_threshold",
    "embedding_key",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cachelm.semantic' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
