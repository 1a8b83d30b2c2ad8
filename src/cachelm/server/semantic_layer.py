"""The proxy's semantic layer: `semantic.cache.SemanticCache` facades per δ over one index and embedder.

A request may ask for its own error bound δ (``x-cachelm-delta``). A δ-bounded rule certifies a
threshold from verified outcomes, and the certificate depends on δ, so each distinct δ gets its own
`SemanticCache` (and `BoundedErrorPolicy`) over the *same* index and embedding cache; at most
`MAX_DELTAS` of them are kept, the least recently used dropped first. With a static threshold configured,
δ has no meaning and is ignored.

Verification (the δ-bounded protocol): a lookup may return a candidate to verify instead of a hit; the
proxy then computes the answer as for a miss, compares it with the candidate's stored answer (same text
of every choice), and reports the outcome with `feedback`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachelm.crypto import Keyring
from cachelm.errors import ConfigError
from cachelm.semantic.cache import Candidate, SemanticCache, SemanticHit
from cachelm.semantic.decision import BoundedErrorConfig, BoundedErrorPolicy, DecisionRule, StaticThreshold
from cachelm.semantic.embedder import Embedder, HashingEmbedder
from cachelm.semantic.embedding_cache import EmbeddingCache
from cachelm.semantic.index import VectorIndex
from cachelm.store.base import Store

MAX_DELTAS = 8


@dataclass(frozen=True, kw_only=True)
class SemanticSettings:
    """How the proxy builds its semantic layer."""

    embedder: str = "minilm"  # "minilm" (the packaged all-MiniLM-L6-v2) or "hashing" (lexical, no model)
    # MiniLM's fine-tuned layers: "default" (the shipped checkpoint), "none" (published weights) or a path
    checkpoint: str = "default"
    delta: float = 0.02  # default error bound of the δ-bounded rule
    # A static cosine threshold instead of the δ-bounded rule; "calibrated" takes the embedder's threshold
    # of best F1 on MeanCache val (checkpoints/semantic/calibration.json, per model id).
    threshold: float | str | None = None
    pg_url: str | None = None  # shared index on PostgreSQL + pgvector; else in-process HNSW
    index_path: str | None = None  # persist the in-process index beside this file (the SQLite store)
    table: str = "cachelm_semantic"

    def __post_init__(self) -> None:
        if self.embedder not in ("minilm", "hashing"):
            raise ConfigError(f"`semantic_embedder` must be 'minilm' or 'hashing', got {self.embedder!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"`delta` must be in (0, 1), got {self.delta!r}")
        if isinstance(self.threshold, str):
            if self.threshold != "calibrated":
                raise ConfigError(f"`threshold` must be a number or 'calibrated', got {self.threshold!r}")
        elif self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ConfigError(f"`threshold` must be in [-1, 1], got {self.threshold!r}")


def _embedder(settings: SemanticSettings) -> Embedder:
    if settings.embedder == "hashing":
        return HashingEmbedder()
    from cachelm.semantic.embedder import MiniLMEmbedder
    from cachelm.semantic.finetuned import DEFAULT_CHECKPOINT

    named = {"default": DEFAULT_CHECKPOINT, "none": None}
    checkpoint = named[settings.checkpoint] if settings.checkpoint in named else Path(settings.checkpoint)
    return MiniLMEmbedder(checkpoint=checkpoint)


def _static_threshold(settings: SemanticSettings, embedder: Embedder) -> float | None:
    """The configured static threshold, "calibrated" resolved for `embedder` (at start-up, so a model
    without a measured threshold fails there, not on the first request)."""
    if settings.threshold != "calibrated":
        return None if settings.threshold is None else float(settings.threshold)
    found = getattr(embedder, "calibrated_threshold", None)
    if found is None:
        raise ConfigError(
            f"`threshold` 'calibrated': no threshold was measured for {embedder.model_id!r}; run "
            "`cachelm eval semantic --report` for these weights or give a number"
        )
    return float(found)


def _index(settings: SemanticSettings, dim: int, keyring: Keyring | None) -> VectorIndex:
    if settings.pg_url is not None:
        from cachelm.semantic.pgvector import PgVectorIndex

        return PgVectorIndex(settings.pg_url, dim, table=settings.table)
    from cachelm.semantic.hnsw import HNSWIndex

    path = None if settings.index_path is None else Path(settings.index_path)
    return HNSWIndex(dim, path=path, keyring=keyring)


class SemanticLayer:
    """Semantic lookups for the proxy; thread-safe (called from worker threads)."""

    def __init__(
        self,
        settings: SemanticSettings,
        store: Store,
        *,
        tenant_secret: bytes = b"",
        keyring: Keyring | None = None,
    ) -> None:
        """`keyring` seals the persisted in-process index (`settings.index_path`) at rest."""
        self.settings = settings
        self.model_revisions: Mapping[str, str] | None = None  # the exact cache's (`use_revisions`)
        embedder = _embedder(settings)
        self.threshold = _static_threshold(settings, embedder)
        self.embeddings = EmbeddingCache(store, embedder)
        self.index = _index(settings, self.embeddings.dim, keyring)
        self._secret = tenant_secret
        self._lock = threading.Lock()
        self._caches: OrderedDict[float, SemanticCache] = OrderedDict()
        self.default = self._cache(settings.delta)

    def _rule(self, delta: float) -> DecisionRule:
        if self.threshold is not None:
            return StaticThreshold(self.threshold)
        return BoundedErrorPolicy(BoundedErrorConfig(delta=delta))

    def _cache(self, delta: float) -> SemanticCache:
        with self._lock:
            cache = self._caches.get(delta)
            if cache is None:
                cache = self._caches[delta] = SemanticCache(
                    embedder=self.embeddings,
                    index=self.index,
                    rule=self._rule(delta),
                    tenant_secret=self._secret,
                    model_revisions=self.model_revisions,
                )
                while len(self._caches) > MAX_DELTAS:
                    self._caches.popitem(last=False)
            self._caches.move_to_end(delta)
            return cache

    def use_revisions(self, model_revisions: Mapping[str, str]) -> None:
        """Key every facade by `model_revisions` (the exact cache's mapping) from now on."""
        with self._lock:
            self.model_revisions = model_revisions
            for cache in self._caches.values():
                cache.model_revisions = model_revisions

    def search(
        self, request: Mapping[str, Any], *, tenant: str, delta: float | None, user: str | None = None
    ) -> tuple[SemanticHit | None, tuple[SemanticCache, Candidate] | None]:
        """A hit to serve, or a candidate to verify (with the facade that must hear the outcome)."""
        use_delta = self.threshold is None and delta is not None and delta != self.settings.delta
        cache = self._cache(delta) if use_delta and delta is not None else self.default
        found = cache.search(request, tenant=tenant, user=user)
        return found.hit, None if found.verify is None else (cache, found.verify)

    def add(
        self, request: Mapping[str, Any], *, tenant: str, response_key: str, user: str | None = None
    ) -> str | None:
        return self.default.add(request, tenant=tenant, response_key=response_key, user=user)

    def remove_tenant(self, tenant: str) -> int:
        return self.default.remove_tenant(tenant)

    def remove_keys(self, tenant: str, response_keys: list[str]) -> int:
        """Delete `tenant`'s entries that point at `response_keys` (answers that were purged or erased)."""
        return self.default.remove_keys(tenant, response_keys)

    def close(self) -> None:
        self.index.close()


def same_answer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two responses say the same thing: equal text (stripped) of every choice, in order."""

    def texts(response: Mapping[str, Any]) -> list[str]:
        out = []
        for choice in response.get("choices") or []:
            message = choice.get("message") if isinstance(choice, Mapping) else None
            text = message.get("content") if isinstance(message, Mapping) else choice.get("text")
            out.append((text or "").strip() if isinstance(text, str) else "")
        return out

    return texts(a) == texts(b)
