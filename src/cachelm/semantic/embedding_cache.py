"""The embedding cache: (tenant, model id, content hash) → vector, on any cachelm `Store`.

It serves the semantic cache (each lookup embeds the last user turn) and the proxy's ``/v1/embeddings``
(batches of inputs), so the main entry point is a batch call that returns vectors in input order with a
hit/miss flag per item.

Keys: SHA-256 over (``b"embedding"``, key-schema version, tenant, model id, text); raw text never reaches the
store. The tenant is part of the key so one tenant cannot learn from hit timing whether another tenant
embedded a text; pass the same tenant everywhere to share vectors deliberately.

Values: the vector as little-endian float32 bytes, prefixed by its dimension (uint32). A value whose length
or dimension does not match the embedder, or that holds NaN or infinity, is treated as a miss and overwritten.

Failures: a store that raises `BackendError`, and a stored value that is no vector of this embedder, turn
into misses (counted in `stats.errors`); the vectors are still computed, so an embedding request never fails
because of the cache.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cachelm.errors import BackendError, ConfigError, check_text
from cachelm.keys import KEY_SCHEMA_VERSION
from cachelm.semantic.embedder import Embedder, Vectors, check_texts
from cachelm.store.base import DEFAULT_TENANT, Match, Record, Store, check_ttl

_HEADER = struct.Struct("<I")  # dimension


def embedding_key(text: str, *, model_id: str, tenant: str = DEFAULT_TENANT) -> str:
    """The store key (64 hex chars) of `text` embedded by `model_id` for `tenant`."""
    check_text("text", text)
    check_tenant(tenant)
    return _digest(text, model_id, tenant)


def _digest(text: str, model_id: str, tenant: str) -> str:
    """`embedding_key` of arguments already checked."""
    h = hashlib.sha256()
    for part in (b"embedding", str(KEY_SCHEMA_VERSION).encode(), tenant.encode(), model_id.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    h.update(text.encode())
    return h.hexdigest()


def encode_vector(vector: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    return _HEADER.pack(flat.shape[0]) + flat.tobytes()


def decode_vector(value: bytes, dim: int) -> np.ndarray | None:
    """The vector in `value`, or None when it is not a `dim`-dimensional encoding of finite numbers."""
    if len(value) != _HEADER.size + 4 * dim or _HEADER.unpack_from(value)[0] != dim:
        return None
    vector = np.frombuffer(value, dtype="<f4", offset=_HEADER.size).astype(np.float32)
    return vector if np.all(np.isfinite(vector)) else None  # corrupt bytes: a miss, then rewritten


@dataclass(frozen=True, kw_only=True)
class EmbeddingBatch:
    """Result of `EmbeddingCache.embed_many`: ``vectors[i]`` embeds ``texts[i]``; ``hits[i]``: was cached."""

    vectors: Vectors  # (n, dim) float32, unit norm
    hits: tuple[bool, ...]

    @property
    def num_hits(self) -> int:
        return sum(self.hits)


@dataclass(kw_only=True)
class EmbeddingCacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # store failures and undecodable values turned into misses
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
            self.errors += errors


class EmbeddingCache:
    """Caches `embedder`'s vectors in `store`. Thread-safe as far as the store and embedder are."""

    def __init__(self, store: Store, embedder: Embedder, *, ttl: float | None = None) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"`store` must be a cachelm Store, got {type(store).__name__}")
        if not isinstance(embedder, Embedder):
            raise ConfigError(f"`embedder` must implement Embedder, got {type(embedder).__name__}")
        check_ttl(ttl)
        self.store = store
        self.embedder = embedder
        self.ttl = ttl
        self.stats = EmbeddingCacheStats()

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def key(self, text: str, *, tenant: str = DEFAULT_TENANT) -> str:
        return embedding_key(text, model_id=self.model_id, tenant=tenant)

    def embed_many(
        self,
        texts: Sequence[str],
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        ttl: float | None = None,
        tags: Sequence[str] = (),
        refresh: bool = False,
    ) -> EmbeddingBatch:
        """Vectors of `texts` in input order; cached ones read, the rest embedded in one batch and stored.

        A vector stored here is attributed to `user` (the one whose text put it there), so erasing that
        user deletes it; a text another user of the tenant had already cached stays theirs. `ttl`
        (seconds; default the cache's) and `tags` (besides "embedding") go with the vectors this call
        stores; `refresh` embeds every text again and overwrites what was cached.
        """
        items = check_texts(texts)
        check_tenant(tenant)
        if not isinstance(user, str):
            raise ConfigError(f"`user` must be a string, got {type(user).__name__}")
        check_ttl(ttl)
        if not isinstance(refresh, bool):  # "no" is truthy: it would recompute and overwrite everything
            raise ConfigError(f"`refresh` must be a bool, got {refresh!r}")
        if isinstance(tags, str):
            raise ConfigError(f"`tags` must be a sequence of non-empty strings, got {tags!r}")
        tags = tuple(tags)  # once: a generator checked here would reach the records empty
        if not all(isinstance(tag, str) and tag for tag in tags):
            raise ConfigError(f"`tags` must be a sequence of non-empty strings, got {tags!r}")
        keys = [_digest(t, self.model_id, tenant) for t in items]  # both checked above
        found: dict[str, np.ndarray] = {}
        errors = 0
        for key in () if refresh else dict.fromkeys(keys):  # each distinct text read once
            try:
                record = self.store.get(key)
            except BackendError:
                errors += 1
                continue
            vector = None if record is None else decode_vector(record.value, self.dim)
            if vector is not None:
                found[key] = vector
            elif record is not None:  # not a vector of this embedder: a miss, counted, then overwritten
                errors += 1
        missing = {k: t for k, t in zip(keys, items, strict=True) if k not in found}
        if missing:
            computed = self.embedder.embed(list(missing.values()))  # (m, dim)
            for (key, _text), vector in zip(missing.items(), computed, strict=True):
                found[key] = vector
                if np.all(np.isfinite(vector)):
                    errors += self._put(key, tenant, user, vector, ttl=ttl, tags=tags)
                else:  # a failing model's output: returned as it came, never stored (it reads as a miss)
                    errors += 1
        hits = tuple(k not in missing for k in keys)
        self.stats.add(hits=sum(hits), misses=len(hits) - sum(hits), errors=errors)
        vectors = np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)
        return EmbeddingBatch(vectors=np.ascontiguousarray(vectors, dtype=np.float32), hits=hits)

    def embed(self, text: str, *, tenant: str = DEFAULT_TENANT, user: str = "") -> tuple[np.ndarray, bool]:
        """``(vector, hit)`` for one text; vector shape ``(dim,)``."""
        if not isinstance(text, str):
            raise ConfigError(f"`text` must be a str, got {type(text).__name__}")
        batch = self.embed_many([text], tenant=tenant, user=user)
        return batch.vectors[0], batch.hits[0]

    def remove_tenant(self, tenant: str) -> int:
        """Delete every vector of `tenant` cached for this embedder's model; returns how many."""
        check_tenant(tenant)
        return self.store.purge(Match(tenant=tenant, tag="embedding", model=self.model_id))

    def _put(
        self, key: str, tenant: str, user: str, vector: np.ndarray, *, ttl: float | None, tags: Sequence[str]
    ) -> int:
        now = self.store.clock()
        ttl = self.ttl if ttl is None else ttl
        record = Record(
            key=key,
            value=encode_vector(vector),
            tenant=tenant,
            user=user,
            model=self.model_id,
            tags=frozenset({"embedding", *tags}),
            created=now,
            expires=None if ttl is None else now + ttl,
        )
        try:
            self.store.put(record)
        except BackendError:
            return 1
        return 0


def check_tenant(tenant: str) -> None:
    """ConfigError unless `tenant` is a non-empty string with a UTF-8 form."""
    if not isinstance(tenant, str) or not tenant:
        raise ConfigError(f"`tenant` must be a non-empty string, got {tenant!r}")
    check_text("tenant", tenant)
