"""Semantic layer: embedder, embedding cache, vector indexes, decision rules, the semantic cache, evaluation.

See docs/SEMANTIC.md for the design and the statistics of the δ-bounded decision rule.
"""

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
