"""The semantic cache facade: request → (tenant, context key, vector) → exact-cache response key.

The semantic cache stores no answers. An entry maps the last user turn of a request, within its context
(`cachelm.keys.semantic_query`: system prompt, earlier turns, model and parameters must match exactly), to
the *response key* under which the exact cache (`cachelm.response`) holds the answer. A hit tells the
caller which key to read; the caller treats a missing answer as a miss.

Serving path: `lookup` never raises for backend trouble. An embedder or index failure becomes a miss and
``stats.errors += 1``; bad arguments still raise `ConfigError`.

Verification protocol (for learning rules such as `BoundedErrorPolicy`): `search` returns, besides a hit,
an optional `Candidate` to verify. The caller then calls the upstream as for a miss, compares the fresh
answer with the answer stored under ``candidate.response_key``, and reports
``feedback(candidate.entry_id, correct)``. Pending verifications are kept per entry (oldest first,
bounded); `feedback` for an entry with none pending and ``correct=False`` is a complaint: the entry is never
served again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cachelm.clock import Clock, wall_clock
from cachelm.errors import BackendError, ConfigError
from cachelm.keys import SemanticQuery, semantic_query, tenant_salt
from cachelm.semantic.decision import BoundedErrorPolicy, Decision, DecisionRule
from cachelm.semantic.embedder import Embedder
from cachelm.semantic.embedding_cache import EmbeddingCache, check_tenant
from cachelm.semantic.index import IndexEntry, Neighbor, VectorIndex

MAX_PENDING = 100_000  # verifications awaiting feedback, all entries together (oldest dropped first)


@dataclass(frozen=True, kw_only=True, slots=True)
class SemanticHit:
    """A semantic hit: read the answer under `response_key` from the exact cache."""

    response_key: str
    similarity: float
    entry_id: str
    decision: Decision


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """The nearest entry of a lookup that was not served but should be verified (see module docstring)."""

    entry_id: str
    response_key: str
    similarity: float
    decision: Decision


@dataclass(frozen=True, kw_only=True, slots=True)
class SemanticLookup:
    """Everything a lookup found: a hit to serve, or a candidate to verify, or neither (a plain miss)."""

    hit: SemanticHit | None
    verify: Candidate | None
    decision: Decision | None  # None when the request has no user turn or a backend failed


_NO_DECISION = SemanticLookup(hit=None, verify=None, decision=None)  # no user turn, or a backend failed


@dataclass(kw_only=True)
class SemanticStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    verifications: int = 0
    feedback: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


@dataclass(frozen=True, slots=True)
class _Pending:
    similarity: float
    region: str
    sampled: bool


def unit_vector(vector: np.ndarray) -> np.ndarray:
    """`vector` as float32 scaled to unit length (a zero vector stays zero; non-finite is left for the
    index to refuse). Similarities are inner products, so only unit vectors make them cosines in [-1, 1]:
    an `Embedder` that skips its normalisation would otherwise score unrelated texts far above any
    threshold. A vector already unit up to float32 rounding is returned as it is (same scores as before)."""
    out = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(out)) if out.ndim == 1 else 0.0
    if norm > 0.0 and np.isfinite(norm) and abs(norm - 1.0) > 1e-4:
        out = out / np.float32(norm)
    return out


def entry_id_for(query: SemanticQuery) -> str:
    """Deterministic id of an entry: the same turn in the same context is one entry (re-adding replaces)."""
    h = hashlib.sha256(b"semantic-entry\x00" + query.context_key.encode() + b"\x00" + query.text.encode())
    return h.hexdigest()


class SemanticCache:
    """Semantic lookup over any `VectorIndex`, with any `DecisionRule`.

    `embedder` may be an `EmbeddingCache` (vectors cached in a store) or a bare `Embedder`.
    `tenant_secret` keys the tenant salt exactly as the exact cache does, so context keys of two tenants
    never collide. `region` chooses the decision rule's statistics unit: "tenant" (one certificate per
    tenant) or "global". `model_revisions` is the exact cache's own mapping (`ExactCache.model_revisions`,
    read live): a model's revision is part of the context key, so once the exact cache switches a model
    to a new revision, no lookup finds an entry that points at an old-revision answer.
    """

    def __init__(
        self,
        *,
        embedder: EmbeddingCache | Embedder,
        index: VectorIndex,
        rule: DecisionRule | None = None,
        tenant_secret: bytes = b"",
        region: str = "tenant",
        clock: Clock = wall_clock,
        model_revisions: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(embedder, EmbeddingCache | Embedder):
            raise ConfigError(
                f"`embedder` must be an EmbeddingCache or Embedder, got {type(embedder).__name__}"
            )
        if not isinstance(index, VectorIndex):
            raise ConfigError(f"`index` must implement VectorIndex, got {type(index).__name__}")
        dim = embedder.dim
        if index.dim != dim:
            raise ConfigError(f"`index` has {index.dim} dimensions but the embedder makes {dim}")
        if region not in ("tenant", "global"):
            raise ConfigError(f"`region` must be 'tenant' or 'global', got {region!r}")
        if not isinstance(tenant_secret, bytes):
            raise ConfigError(f"`tenant_secret` must be bytes, got {type(tenant_secret).__name__}")
        if model_revisions is not None and not isinstance(model_revisions, Mapping):
            raise ConfigError(
                f"`model_revisions` must be a mapping or None, got {type(model_revisions).__name__}"
            )
        self.model_revisions = model_revisions
        self.embedder = embedder
        self.index = index
        self.rule: DecisionRule = rule if rule is not None else BoundedErrorPolicy()
        if not isinstance(self.rule, DecisionRule):
            raise ConfigError(f"`rule` must implement DecisionRule, got {type(self.rule).__name__}")
        self._secret = tenant_secret
        self._region_mode = region
        self.clock = clock
        self.stats = SemanticStats()
        self._pending: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self._num_pending = 0
        self._lock = threading.Lock()

    # -- keys ------------------------------------------------------------------------------------
    def query(self, request: Mapping[str, Any], *, tenant: str) -> SemanticQuery | None:
        """The (text, context key) split of `request` for `tenant`; None when it has no last user turn.

        The context key also digests the embedder's model id: vectors of different embedders (a new
        checkpoint, int8 vs float) live in different partitions of a persisted index and are never compared.
        It digests the answering model's revision too (when `model_revisions` names one), as the exact
        cache's response key does.
        """
        query = semantic_query(request, tenant_salt=tenant_salt(tenant, self._secret))
        if query is None:
            return None
        digest = hashlib.sha256(
            b"semantic-embedder\x00" + self.embedder.model_id.encode() + b"\x00" + query.context_key.encode()
        )
        model, revisions = request.get("model"), self.model_revisions
        revision = revisions.get(model, "") if revisions and isinstance(model, str) else ""
        if revision:  # an empty revision leaves the key as it was before revisions existed
            digest.update(b"\x00revision\x00" + revision.encode())
        return SemanticQuery(text=query.text, context_key=digest.hexdigest())

    def _embed(self, text: str, tenant: str, request: Mapping[str, Any], user: str | None) -> np.ndarray:
        """The question's vector. A failing model (torch's RuntimeError, out of memory, a missing file) is
        translated to `BackendError` here, so the serving path treats it as a failing tier: a miss and a
        counter, never a failed request."""
        try:
            if isinstance(self.embedder, EmbeddingCache):  # a vector it stores belongs to the request's user
                owner = request.get("user") if user is None else user
                owner = owner if isinstance(owner, str) else ""
                return self.embedder.embed(text, tenant=tenant, user=owner)[0]
            return np.asarray(self.embedder.embed([text])[0], dtype=np.float32)
        except (RuntimeError, MemoryError, OSError) as exc:
            raise BackendError(f"embedder failed: {type(exc).__name__}: {exc}") from exc

    def _region(self, tenant: str) -> str:
        return tenant if self._region_mode == "tenant" else "global"

    # -- lookup ----------------------------------------------------------------------------------
    def lookup(self, request: Mapping[str, Any], *, tenant: str) -> SemanticHit | None:
        """The hit to serve for `request`, or None (a miss). Verification candidates are dropped."""
        return self.search(request, tenant=tenant).hit

    def search(self, request: Mapping[str, Any], *, tenant: str, user: str | None = None) -> SemanticLookup:
        """Look `request` up: a hit, or a candidate the caller should verify, or a plain miss.

        `user` owns the question vector an embedding cache stores on the way (erasure); None: the
        request's own ``user``."""
        query = self.query(request, tenant=tenant)  # validates request and tenant
        if query is not None and query.text.strip():
            try:
                vector = self._embed(query.text, tenant, request, user)
            except BackendError:
                self.stats.add("errors")
            else:
                return self.search_vector(vector, tenant=tenant, context_key=query.context_key)
        self.stats.add("lookups")
        self.stats.add("misses")
        return _NO_DECISION

    def search_vector(self, vector: np.ndarray, *, tenant: str, context_key: str) -> SemanticLookup:
        """`search` with the embedding and context key already computed (evaluation, batch paths)."""
        self.stats.add("lookups")
        try:
            found = self.index.search(unit_vector(vector), tenant=tenant, context_key=context_key, k=1)
        except BackendError:
            self.stats.add("errors")
            self.stats.add("misses")
            return _NO_DECISION
        return self._decide(found[0] if found else None, tenant)

    def _decide(self, nearest: Neighbor | None, tenant: str) -> SemanticLookup:
        region = self._region(tenant)
        similarity = None if nearest is None else float(nearest.similarity)
        decision = self.rule.decide(
            similarity, entry_id=None if nearest is None else nearest.entry_id, region=region
        )
        if nearest is not None and decision.serve:
            self.stats.add("hits")
            hit = SemanticHit(
                response_key=nearest.response_key,
                similarity=nearest.similarity,
                entry_id=nearest.entry_id,
                decision=decision,
            )
            return SemanticLookup(hit=hit, verify=None, decision=decision)
        self.stats.add("misses")
        if nearest is None or not decision.verify:
            return SemanticLookup(hit=None, verify=None, decision=decision)
        self.stats.add("verifications")
        self._remember(nearest.entry_id, _Pending(nearest.similarity, region, decision.sampled))
        candidate = Candidate(
            entry_id=nearest.entry_id,
            response_key=nearest.response_key,
            similarity=nearest.similarity,
            decision=decision,
        )
        return SemanticLookup(hit=None, verify=candidate, decision=decision)

    def _remember(self, entry_id: str, pending: _Pending) -> None:
        with self._lock:
            queue = self._pending.setdefault(entry_id, deque(maxlen=64))
            self._pending.move_to_end(entry_id)
            before = len(queue)
            queue.append(pending)
            self._num_pending += len(queue) - before
            while self._num_pending > MAX_PENDING:  # forget the stalest entry's pending verifications
                _, dropped = self._pending.popitem(last=False)
                self._num_pending -= len(dropped)

    # -- writes ----------------------------------------------------------------------------------
    def add(
        self, request: Mapping[str, Any], *, tenant: str, response_key: str, user: str | None = None
    ) -> str | None:
        """Index `request`'s last user turn → `response_key`; returns the entry id (None: not indexable).
        `user` as in `search`.

        Call after the exact cache stored the answer under `response_key` (on upstream success only).
        Raises `BackendError` when the index fails: on the write path the caller decides.
        """
        if not isinstance(response_key, str) or not response_key:
            raise ConfigError(f"`response_key` must be a non-empty string, got {response_key!r}")
        query = self.query(request, tenant=tenant)
        if query is None or not query.text.strip():
            return None
        vector = self._embed(query.text, tenant, request, user)
        return self.add_vector(
            vector,
            tenant=tenant,
            context_key=query.context_key,
            response_key=response_key,
            entry_id=entry_id_for(query),
        )

    def add_vector(
        self, vector: np.ndarray, *, tenant: str, context_key: str, response_key: str, entry_id: str
    ) -> str:
        """`add` with the embedding, context key and entry id already computed."""
        entry = IndexEntry(
            entry_id=entry_id,
            tenant=tenant,
            context_key=context_key,
            response_key=response_key,
            vector=unit_vector(vector),
            created=self.clock(),
        )
        self.index.add([entry])
        return entry_id

    def feedback(self, entry_id: str, correct: bool) -> bool:
        """Report whether `entry_id`'s answer was right for its oldest pending verification.

        Returns True when it matched a pending verification. Without one, ``correct=False`` vetoes the entry
        (it is never served again) and True is ignored; both return False.
        """
        if not isinstance(entry_id, str) or not entry_id:
            raise ConfigError(f"`entry_id` must be a non-empty string, got {entry_id!r}")
        if not isinstance(correct, bool):
            raise ConfigError(f"`correct` must be a bool, got {correct!r}")
        self.stats.add("feedback")
        with self._lock:
            queue = self._pending.get(entry_id)
            pending = queue.popleft() if queue else None
            if pending is not None:
                self._num_pending -= 1
                if not queue:
                    del self._pending[entry_id]
        if pending is None:
            if not correct and isinstance(self.rule, BoundedErrorPolicy):
                self.rule.veto(entry_id)
            return False
        self.rule.observe(
            pending.similarity, correct, entry_id=entry_id, region=pending.region, sampled=pending.sampled
        )
        return True

    def remove_tenant(self, tenant: str) -> int:
        """Delete every entry of `tenant`; returns how many."""
        check_tenant(tenant)
        return self.index.remove_tenant(tenant)

    def remove_keys(self, tenant: str, response_keys: Iterable[str]) -> int:
        """Delete the entries of `tenant` that point at any of `response_keys` (invalidated answers)."""
        check_tenant(tenant)
        keys = [response_keys] if isinstance(response_keys, str) else list(response_keys)
        return self.index.remove_response_keys(tenant, keys)

    def close(self) -> None:
        self.index.close()
