"""`Governance`: keep a cache's answers good — bad-answer feedback and model-version refresh.

One object over the caches it governs: an `ExactCache` (answers), optionally a `SemanticCache` (entries
pointing at answers), and a `RequestLog` (the questions, in the exact cache's store by default).

Bad-answer feedback (`mark_bad`), the contract:

1. The bad entry is named by its response key or by its request (then keyed like the exact cache does).
   A key of another tenant reads as unknown: nothing of another tenant is ever touched, and nothing says
   whether the key exists there.
2. The bad entry's vector is its last user turn, embedded (request known, from the argument or the log),
   or read back from the index (`cachelm.governance.vectors`).
3. Its *neighbours* are the semantic entries of the same tenant **and the same context key** whose
   similarity to that vector is >= `similarity`. Entries in other contexts are never neighbours: a context
   key digests the model, its parameters, the system prompt and the earlier turns, so an answer in another
   context answers a different request, and one bad answer says nothing about it. (The index also cannot
   compare across partitions by construction.)
4. The negative outcome goes to the decision rule first (`SemanticCache.feedback(entry_id, False)`): a
   pending verification becomes a wrong-answer sample of the δ-bounded certificate; without one the entry is
   vetoed. Then the answers of the bad entry and of every neighbour leave the exact cache (they can no
   longer be served, even by another process holding a stale index), then their semantic entries, then
   their logged requests. Finally the rule forgets the removed entries' per-entry state: entry ids name
   questions, and a fresh answer to the same question must not inherit the old answer's veto.
   A failure midway raises `BackendError` (an administrative call), leaving the veto in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cachelm.errors import BackendError, ConfigError
from cachelm.governance.journal import LoggedRequest, RequestLog
from cachelm.governance.vectors import entries_for_response_key
from cachelm.response.exact import ENDPOINTS, ExactCache
from cachelm.semantic.cache import SemanticCache, entry_id_for
from cachelm.semantic.embedding_cache import EmbeddingCache
from cachelm.store.base import DEFAULT_TENANT, Record

if TYPE_CHECKING:
    from cachelm.governance.refresh import RefreshJob, Value

LAYER = "governance"
NEIGHBOUR_BATCH = 32  # first k of the neighbour search; doubled while the k-th is still above the bar


@dataclass(frozen=True, kw_only=True, slots=True)
class Neighbour:
    """A semantic entry removed with a bad answer, and its similarity to the bad entry."""

    entry_id: str
    response_key: str
    similarity: float


@dataclass(frozen=True, kw_only=True, slots=True)
class BadAnswerReport:
    """What `mark_bad` removed (all of one tenant)."""

    tenant: str
    response_key: str  # the bad answer's key
    response_keys: tuple[str, ...]  # every answer removed from the exact cache (bad one first)
    entries: tuple[Neighbour, ...]  # every semantic entry removed, the bad entry's own included
    feedback: int  # outcomes reported to the decision rule (one per semantic entry of the bad answer)
    neighbours_searched: bool  # False when no vector of the bad entry was available (no semantic layer…)


def _embed(semantic: SemanticCache, text: str, tenant: str, user: str) -> np.ndarray:
    """The vector `semantic` would index for `text` (through its embedding cache when it has one; a
    vector cached on the way belongs to `user`, the answer's, so that user's erasure takes it)."""
    if isinstance(semantic.embedder, EmbeddingCache):
        return semantic.embedder.embed(text, tenant=tenant, user=user)[0]
    return np.asarray(semantic.embedder.embed([text])[0], dtype=np.float32)


def _check_tenant(tenant: Any) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise ConfigError(f"`tenant` must be a non-empty string, got {tenant!r}")


class Governance:
    """Feedback and refresh over an exact cache, an optional semantic cache and a request log."""

    def __init__(
        self,
        exact: ExactCache,
        *,
        semantic: SemanticCache | None = None,
        log: RequestLog | None = None,
    ) -> None:
        if not isinstance(exact, ExactCache):
            raise ConfigError(f"`exact` must be an ExactCache, got {type(exact).__name__}")
        if semantic is not None and not isinstance(semantic, SemanticCache):
            raise ConfigError(f"`semantic` must be a SemanticCache or None, got {type(semantic).__name__}")
        if log is not None and not isinstance(log, RequestLog):
            raise ConfigError(f"`log` must be a RequestLog or None, got {type(log).__name__}")
        if semantic is not None:  # one revision mapping for both caches: a switch moves both keys
            if semantic.model_revisions is None:
                semantic.model_revisions = exact.model_revisions
            elif semantic.model_revisions is not exact.model_revisions:
                raise ConfigError(
                    "`semantic.model_revisions` must be the exact cache's own mapping "
                    "(SemanticCache(model_revisions=exact.model_revisions)) or None"
                )
        self.exact = exact
        self.semantic = semantic
        self.log = log if log is not None else RequestLog(exact.backend)

    # -- write path -------------------------------------------------------------------------------
    def store(
        self,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        tags: Iterable[str] = (),
        ttl: float | None = None,
        endpoint: str = "chat.completions",
        allow_sampled: bool = False,
    ) -> str | None:
        """`ExactCache.store`, plus the request log and the semantic entry; returns the key or None.

        The answer is written first; a failing log or index write is counted (``errors{layer=governance}``)
        and does not undo it: on the serving path a failing tier is a miss, never a failed request.
        """
        key = self.exact.store(
            request, response, tenant=tenant, user=user, tags=tags, ttl=ttl, endpoint=endpoint,
            allow_sampled=allow_sampled,
        )  # fmt: skip
        if key is not None:
            self.remember(request, key, endpoint=endpoint)
        return key

    def remember(self, request: Mapping[str, Any], response_key: str, *, endpoint: str) -> bool:
        """Log `request` behind the stored answer `response_key` and index it semantically.

        For callers that write answers themselves (e.g. a proxy's write path). Returns False when the
        answer is not in the store, or when a write failed (then counted in ``errors{layer=governance}``).
        """
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"`endpoint` must be one of {ENDPOINTS}, got {endpoint!r}")
        try:
            answer = self.exact.backend.peek(response_key)
            if answer is None:
                return False
            self.log.remember(request, answer, endpoint=endpoint)
            if self.semantic is not None and endpoint != "embeddings":
                # The answer's user owns the question vector the semantic layer caches (erasure).
                user = answer.user or None
                self.semantic.add(request, tenant=answer.tenant, response_key=response_key, user=user)
        except BackendError:
            self.exact.metrics.error(LAYER, "backend")
            return False
        return True

    # -- feedback ---------------------------------------------------------------------------------
    def mark_bad(
        self,
        target: str | Mapping[str, Any],
        *,
        tenant: str,
        similarity: float = 0.9,
        endpoint: str = "chat.completions",
    ) -> BadAnswerReport:
        """Remove a bad answer and its semantic neighbours at >= `similarity` (module docstring).

        `target` is the answer's response key or its request. Raises `ConfigError` for bad arguments and
        `BackendError` when a store or index fails (nothing is retried; running it again is safe).
        """
        _check_tenant(tenant)
        if isinstance(similarity, bool) or not isinstance(similarity, int | float):
            raise ConfigError(f"`similarity` must be a number in [-1, 1], got {similarity!r}")
        if not (math.isfinite(similarity) and -1.0 <= similarity <= 1.0):
            raise ConfigError(f"`similarity` must be a number in [-1, 1], got {similarity!r}")
        logged = None
        if isinstance(target, Mapping):
            request: Mapping[str, Any] | None = target
            key = self.exact.key_for(target, tenant=tenant, endpoint=endpoint)
        elif isinstance(target, str) and target:
            key = target
            logged = self.log.get(key, tenant=tenant)
            request = None if logged is None else logged.request
        else:
            raise ConfigError(f"`target` must be a response key or a request mapping, got {target!r}")
        seeds = self._seed_entries(key, request, tenant, self._owner(key, tenant, logged, request))
        feedback = 0
        if self.semantic is not None:
            for entry_id, _ctx, _vec in seeds:
                self.semantic.feedback(entry_id, False)
                feedback += 1
        removed = self._neighbours(seeds, tenant, float(similarity))
        keys = list(dict.fromkeys([key, *(n.response_key for n in removed)]))
        gone = [k for k in keys if self._delete_answer(k, tenant)]
        if self.semantic is not None:
            self.semantic.index.remove([n.entry_id for n in removed])
            self.semantic.remove_keys(tenant, keys)
            # The seeds too: a seed no longer indexed (already removed as another answer's neighbour) was
            # vetoed above and is in no `removed` entry; its question's next answer must start clean.
            forgotten = [n.entry_id for n in removed] + [entry_id for entry_id, _ctx, _vec in seeds]
            self.semantic.rule.forget(list(dict.fromkeys(forgotten)))
        return BadAnswerReport(
            tenant=tenant,
            response_key=key,
            response_keys=tuple(gone),
            entries=tuple(removed),
            feedback=feedback,
            neighbours_searched=bool(seeds),
        )

    def _owner(
        self, key: str, tenant: str, logged: LoggedRequest | None, request: Mapping[str, Any] | None
    ) -> str:
        """The user the bad answer's question belongs to: the logged one, else the stored answer's (if it
        is `tenant`'s), else the request's own ``user`` field."""
        if logged is not None:
            return logged.user
        if self.semantic is None or request is None:
            return ""
        answer = self.exact.backend.peek(key)
        if answer is not None and answer.tenant == tenant:
            return answer.user
        owner = request.get("user")
        return owner if isinstance(owner, str) else ""

    def _seed_entries(
        self, key: str, request: Mapping[str, Any] | None, tenant: str, user: str
    ) -> list[tuple[str, str, np.ndarray]]:
        """``(entry_id, context_key, vector)`` of the bad answer's semantic entries."""
        semantic = self.semantic
        if semantic is None:
            return []
        if request is not None:
            query = semantic.query(request, tenant=tenant)
            if query is None or not query.text.strip():
                return []
            vector = _embed(semantic, query.text, tenant, user)
            return [(entry_id_for(query), query.context_key, vector)]
        return [(e.entry_id, e.context_key, e.vector) for e in entries_for_response_key(
            semantic.index, tenant, key
        )]  # fmt: skip

    def _neighbours(
        self, seeds: list[tuple[str, str, np.ndarray]], tenant: str, bar: float
    ) -> list[Neighbour]:
        """Every entry of the seeds' partitions at similarity >= `bar` to a seed (the seeds included)."""
        if self.semantic is None:
            return []
        index = self.semantic.index
        found: dict[str, Neighbour] = {}
        for entry_id, context_key, vector in seeds:
            k = NEIGHBOUR_BATCH
            while True:
                near = index.search(vector, tenant=tenant, context_key=context_key, k=k)
                if len(near) < k or near[-1].similarity < bar:
                    break
                k *= 2  # the k-th is still above the bar: there may be more
            for n in near:
                # The seed itself always goes, even when rounding puts its self-similarity below 1.0.
                if n.similarity >= bar or n.entry_id == entry_id:
                    old = found.get(n.entry_id)
                    if old is None or n.similarity > old.similarity:
                        found[n.entry_id] = Neighbour(
                            entry_id=n.entry_id, response_key=n.response_key, similarity=n.similarity
                        )
        return sorted(found.values(), key=lambda n: (-n.similarity, n.entry_id))

    def _delete_answer(self, key: str, tenant: str) -> bool:
        """Delete the answer `key` and its logged request if they belong to `tenant`."""
        backend = self.exact.backend
        answer: Record | None = backend.peek(key)
        if answer is None or answer.tenant != tenant:
            # Missing, or another tenant's: that tenant's data is never touched (and the log record
            # of a missing answer is collected with it).
            if answer is None and self.log.get(key, tenant=tenant) is not None:
                self.log.delete(key)
            return False
        deleted = backend.delete(key)
        self.log.delete(key)
        return deleted

    # -- model-version change ---------------------------------------------------------------------
    def refresh_on_model_change(
        self,
        model: str,
        new_revision: str,
        *,
        recompute: Any,
        budget: int | float,
        value: Value | None = None,
        tenant: str | None = None,
        switched_at: float | None = None,
        start: bool = True,
    ) -> RefreshJob:
        """Switch `model` to `new_revision` and refresh its most valuable entries in the background.

        See `cachelm.governance.refresh` for the contract; returns the running (or, with ``start=False``,
        planned) job.
        """
        from cachelm.governance.refresh import RefreshJob, plan_refresh

        if not callable(recompute):  # checked before planning: planning takes old answers out
            raise ConfigError(
                f"`recompute` must be callable (request, endpoint) → response, got {recompute!r}"
            )
        plan = plan_refresh(
            self, model, new_revision, budget=budget, value=value, tenant=tenant, switched_at=switched_at
        )
        job = RefreshJob(self, plan, recompute)
        if start:
            job.start()
        return job
