"""Model-version refresh: recompute the most valuable answers under the new revision, drop the rest.

The revision of a model is part of every response key (`ExactCache.set_model_revision`), so a new
revision makes the old answers unreachable by key. Dropping them all throws away the answers most worth
keeping; recomputing them all may cost more than the cache ever saved. A refresh does neither:

Planning (synchronous, in `Governance.refresh_on_model_change`, before it returns):

1. The exact cache switches `model` to the new revision (``purge=False``): from now on every lookup keys
   by the new revision, so an old answer is never served for a new request by key.
2. One scan of the store finds the model's answers (and their logged requests). An answer is *old* when
   its logged request keys differently under the new revision, or — for an answer with no logged request,
   whose key cannot be recomputed — when it was created before `switched_at` (default: now; when the
   cache was already at the new revision — a second run — such answers are kept).
3. Old answers are taken out of service at once: their semantic entries leave the index first (a semantic
   hit reads the answer by its old key, the one path that could still serve it), then the answers and
   their logged requests leave the store. The request text needed to recompute stays in memory only.
4. Each old answer with a logged request is valued (below); the most valuable are planned within the
   budget. Answers without a logged request cannot be recomputed and are counted as dropped.

Running (a background thread, or `RefreshJob.run` in the caller's thread): planned entries are processed
in value order. For each, if the new key already holds an answer (a live request recomputed it first) it
is kept (``already_fresh``); otherwise ``recompute(request, endpoint)`` is called (with ``tenant=…`` too
when it takes that keyword) and, when it returns a complete cacheable answer, the answer, its logged
request and its semantic entry are written under the new key, in that order. A failure anywhere (the
upstream raised, answered an error, or a write failed) undoes that entry's writes and counts it as
``failed``: a half-written entry is never left behind, and an error body is never cached. `cancel` stops
the job between entries (an entry in flight completes); the entries not reached are dropped. Serving
goes on throughout: new requests simply miss until refreshed.

Value of an entry (the default, `default_value`)::

    value = (hits + 1) × cost × 2^(−age / half_life)

- ``hits``: times the answer was served (the store's hit count); +1 counts the request that stored it, so
  an entry never served yet is worth its cost once instead of nothing;
- ``cost``: the recompute cost in USD, ``prompt_tokens × input price + completion_tokens × output price``
  from the stored answer's ``usage`` and the metrics price table (`CacheMetrics.price`); a model without a
  price is costed at 1 USD per 1M tokens (the ranking within one model is then by tokens); an answer
  without ``usage`` is costed from its size (4 bytes per output token);
- ``age``: seconds since the answer was stored; ``half_life`` 7 days: a recent answer predicts future hits
  better than an old one of the same count.

Budget: an ``int`` is the number of entries to recompute (upstream calls); a ``float`` is USD to spend
(estimated costs of the entries chosen; entries are taken greedily by value, skipping those that no longer
fit).

Caveats: the switch in step 1 is per `ExactCache` object; every process that serves the cache must switch
too. Between the switch and step 3 (one scan) a concurrent semantic lookup may still serve an old answer.
A request that computed its key before the switch and stores its answer just after it writes under the
old key with a new timestamp: such an answer (if it has no logged request) is kept, unreachable by key,
until it expires or is purged.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cachelm.errors import BackendError, ConfigError
from cachelm.governance.journal import LoggedRequest, decode, is_log_key
from cachelm.response.exact import cacheable_response
from cachelm.store.base import Match, Record

if TYPE_CHECKING:
    from cachelm.governance.core import Governance

LAYER = "governance"
HALF_LIFE = 7 * 86400.0  # seconds
UNPRICED_USD_PER_MTOK = 1.0
BYTES_PER_TOKEN = 4
MAX_ERRORS_KEPT = 20

# (request, endpoint) → response. A recompute that declares a `tenant` keyword is also told whose request
# it recomputes (a local engine keys its KV prefix cache by tenant: an erasure must find those blocks).
Recompute = Callable[..., Mapping[str, Any]]


def _takes_tenant(recompute: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(recompute).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the two-argument form
        return False
    return any(p.name == "tenant" and p.kind != p.POSITIONAL_ONLY for p in parameters)


@dataclass(frozen=True, kw_only=True, slots=True)
class EntryStats:
    """What the value of an old entry is computed from."""

    response_key: str
    tenant: str
    model: str
    hits: int
    age: float  # seconds since stored (>= 0)
    input_tokens: int
    output_tokens: int
    cost: float  # estimated USD to recompute


Value = Callable[[EntryStats], float]


def recency_value(half_life: float = HALF_LIFE) -> Value:
    """The default value formula with another half-life (seconds)."""
    if isinstance(half_life, bool) or not isinstance(half_life, int | float) or not half_life > 0:
        raise ConfigError(f"`half_life` must be a number of seconds > 0, got {half_life!r}")

    def value(entry: EntryStats) -> float:
        return float((entry.hits + 1) * entry.cost * 2.0 ** (-entry.age / half_life))

    return value


default_value: Value = recency_value(HALF_LIFE)


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedEntry:
    stats: EntryStats
    logged: LoggedRequest
    value: float


@dataclass(frozen=True, kw_only=True, slots=True)
class RefreshPlan:
    """What a refresh found and chose. `planned` is in value order, best first."""

    model: str
    revision: str
    old_entries: int  # old answers taken out of service
    unlogged: int  # of those, without a logged request: cannot be recomputed
    planned: tuple[PlannedEntry, ...]
    budget: int | float


@dataclass(frozen=True, kw_only=True, slots=True)
class RefreshProgress:
    """A snapshot of a refresh job. At the end, refreshed + already_fresh + failed + dropped = old_entries."""

    state: str  # planned | running | done | cancelled | crashed
    model: str
    revision: str
    old_entries: int
    planned: int
    processed: int
    refreshed: int
    already_fresh: int
    failed: int
    dropped: int
    spent_usd: float  # estimated cost of the recomputations done
    errors: tuple[str, ...]  # the first failures, ``<key prefix>: <error>`` (no request text)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "crashed")


def check_budget(budget: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ConfigError(f"`budget` must be an int (entries) or a float (USD), got {budget!r}")
    if not (math.isfinite(budget) and budget >= 0):
        raise ConfigError(f"`budget` must be >= 0, got {budget!r}")


def entry_stats(record: Record, now: float, price_of: Callable[[str], Any]) -> EntryStats:
    """The `EntryStats` of a stored answer (usage read from its JSON; size when there is none)."""
    input_tokens, output_tokens = 0, max(1, math.ceil(record.size / BYTES_PER_TOKEN))
    try:
        usage = json.loads(record.value).get("usage")
    except (UnicodeDecodeError, ValueError, AttributeError):
        usage = None  # encrypted or foreign bytes: cost from size
    if isinstance(usage, Mapping):
        got_in = usage.get("prompt_tokens", usage.get("input_tokens"))
        got_out = usage.get("completion_tokens", usage.get("output_tokens", 0))
        if isinstance(got_in, int) and isinstance(got_out, int) and got_in >= 0 and got_out >= 0:
            input_tokens, output_tokens = got_in, got_out
    price = price_of(record.model)
    if price is not None:
        cost = price.cost(input_tokens, output_tokens)
    else:
        cost = (input_tokens + output_tokens) * UNPRICED_USD_PER_MTOK / 1_000_000
    return EntryStats(
        response_key=record.key,
        tenant=record.tenant,
        model=record.model,
        hits=record.hits,
        age=max(0.0, now - record.created),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost,
    )


def plan_refresh(
    gov: Governance,
    model: str,
    revision: str,
    *,
    budget: int | float,
    value: Value | None,
    tenant: str | None,
    switched_at: float | None,
) -> RefreshPlan:
    """Steps 1–4 of the module docstring: switch, find the old answers, take them out, rank them."""
    if not isinstance(model, str) or not model:
        raise ConfigError(f"`model` must be a non-empty string, got {model!r}")
    if not isinstance(revision, str):
        raise ConfigError(f"`revision` must be a string, got {revision!r}")
    check_budget(budget)
    if value is not None and not callable(value):
        raise ConfigError(f"`value` must be callable (EntryStats → float), got {value!r}")
    if switched_at is not None and (
        isinstance(switched_at, bool)
        or not isinstance(switched_at, int | float)
        or not math.isfinite(switched_at)
    ):
        raise ConfigError(f"`switched_at` must be a wall-clock time in seconds or None, got {switched_at!r}")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise ConfigError(f"`tenant` must be a non-empty string or None, got {tenant!r}")
    exact = gov.exact
    now = exact.clock()
    if switched_at is None and exact.model_revisions.get(model) == revision:
        # Already switched earlier (a second run): answers without a logged request cannot be told apart
        # by key, and may well be new-revision answers written since; keep them.
        switched = -math.inf
    else:
        switched = now if switched_at is None else float(switched_at)
    exact.set_model_revision(model, revision, purge=False)
    old = _old_answers(gov, model, tenant, switched)
    rate = value if value is not None else default_value
    ranked = []
    for record, logged in old:  # valued before anything is deleted: a failing `value` loses nothing
        if logged is None:
            continue
        stats = entry_stats(record, now, exact.metrics.price)
        ranked.append(PlannedEntry(stats=stats, logged=logged, value=float(rate(stats))))
    ranked.sort(key=lambda e: (-e.value, -e.stats.cost, e.stats.age, e.stats.response_key))
    _take_out_of_service(gov, old)
    return RefreshPlan(
        model=model,
        revision=revision,
        old_entries=len(old),
        unlogged=sum(logged is None for _, logged in old),
        planned=tuple(_within_budget(ranked, budget)),
        budget=budget,
    )


def _old_answers(
    gov: Governance, model: str, tenant: str | None, switched: float
) -> list[tuple[Record, LoggedRequest | None]]:
    answers: dict[str, Record] = {}
    logs: dict[str, LoggedRequest] = {}
    for record in gov.exact.backend.scan(Match(model=model, tenant=tenant)):
        if not is_log_key(record.key):
            answers[record.key] = record
        elif (logged := decode(record)) is not None:
            logs[logged.response_key] = logged
    old: list[tuple[Record, LoggedRequest | None]] = []
    for key, record in answers.items():
        logged = logs.get(key)
        if logged is not None and logged.tenant == record.tenant:
            fresh = gov.exact.key_for(logged.request, tenant=record.tenant, endpoint=logged.endpoint)
            if fresh != key:
                old.append((record, logged))
        elif record.created < switched:
            old.append((record, None))
    return old


def _take_out_of_service(gov: Governance, old: list[tuple[Record, LoggedRequest | None]]) -> None:
    by_tenant: dict[str, list[str]] = {}
    for record, _ in old:
        by_tenant.setdefault(record.tenant, []).append(record.key)
    if gov.semantic is not None:  # first: a semantic hit is the one path that still reads old keys
        for tenant, keys in by_tenant.items():
            gov.semantic.remove_keys(tenant, keys)
    for record, logged in old:
        gov.exact.backend.delete(record.key)
        if logged is not None:
            gov.log.delete(record.key)


def _within_budget(ranked: list[PlannedEntry], budget: int | float) -> list[PlannedEntry]:
    if isinstance(budget, int):
        return ranked[:budget]
    chosen, spent = [], 0.0
    for entry in ranked:  # greedy by value; an entry that does not fit is skipped, later ones may
        if spent + entry.stats.cost <= budget:
            chosen.append(entry)
            spent += entry.stats.cost
    return chosen


class RefreshJob:
    """Runs a `RefreshPlan`: `start` (background thread) or `run` (this thread). Thread-safe."""

    def __init__(self, gov: Governance, plan: RefreshPlan, recompute: Recompute) -> None:
        if not callable(recompute):
            raise ConfigError(
                f"`recompute` must be callable (request, endpoint) → response, got {recompute!r}"
            )
        self.gov = gov
        self.plan = plan
        self.recompute = recompute
        self._with_tenant = _takes_tenant(recompute)
        self.exception: BaseException | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        unplanned = plan.old_entries - len(plan.planned)
        self._progress = RefreshProgress(
            state="planned", model=plan.model, revision=plan.revision, old_entries=plan.old_entries,
            planned=len(plan.planned), processed=0, refreshed=0, already_fresh=0, failed=0,
            dropped=unplanned, spent_usd=0.0, errors=(),
        )  # fmt: skip

    @property
    def progress(self) -> RefreshProgress:
        with self._lock:
            return self._progress

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._progress = replace(self._progress, **changes)

    def start(self) -> RefreshJob:
        """Run in a daemon thread; returns self. Starting twice raises `ConfigError`."""
        with self._lock:
            if self._progress.state != "planned":
                raise ConfigError(f"refresh job already {self._progress.state}")
            self._progress = replace(self._progress, state="running")
        self._thread = threading.Thread(
            target=self._run, name=f"cachelm-refresh-{self.plan.model}", daemon=True
        )
        self._thread.start()
        return self

    def run(self) -> RefreshProgress:
        """Run in the caller's thread; returns the final progress (raises what crashed the job)."""
        with self._lock:
            if self._progress.state != "planned":
                raise ConfigError(f"refresh job already {self._progress.state}")
            self._progress = replace(self._progress, state="running")
        self._run()
        return self.result()

    def cancel(self) -> None:
        """Stop after the entry in flight; the entries not reached are dropped."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (True) or `timeout` seconds passed (False)."""
        if self.progress.state == "planned":
            raise ConfigError("refresh job was never started")
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> RefreshProgress:
        """The final progress; raises `TimeoutError` if unfinished, or what crashed the job."""
        if not self.wait(timeout):
            raise TimeoutError(f"refresh of {self.plan.model} still running after {timeout} s")
        if self.exception is not None:
            raise self.exception
        return self.progress

    async def join(self) -> RefreshProgress:
        """`result` for coroutines: waits in a worker thread, so the event loop keeps serving."""
        import asyncio

        await asyncio.to_thread(self.wait)
        return self.result(0)

    def _run(self) -> None:
        done = 0
        try:
            for entry in self.plan.planned:
                if self._cancel.is_set():
                    break
                self._one(entry)
                done += 1
        except BaseException as exc:  # not an entry's failure (those are counted): surface it in result()
            self.exception = exc
        finally:
            left = len(self.plan.planned) - done
            state = "crashed" if self.exception is not None else "cancelled" if left else "done"
            with self._lock:
                self._progress = replace(self._progress, state=state, dropped=self._progress.dropped + left)
            self._done.set()

    def _one(self, entry: PlannedEntry) -> None:
        try:
            outcome = self._refresh(entry.logged)
        except Exception as exc:  # any upstream or store failure: count it, go on
            self.gov.exact.metrics.error(LAYER, "refresh")
            with self._lock:
                p = self._progress
                errors = p.errors
                if len(errors) < MAX_ERRORS_KEPT:
                    errors = (*errors, f"{entry.stats.response_key[:12]}: {type(exc).__name__}: {exc}")
                self._progress = replace(p, processed=p.processed + 1, failed=p.failed + 1, errors=errors)
            return
        with self._lock:
            p = self._progress
            if outcome == "refreshed":
                p = replace(p, refreshed=p.refreshed + 1, spent_usd=p.spent_usd + entry.stats.cost)
            else:
                p = replace(p, already_fresh=p.already_fresh + 1)
            self._progress = replace(p, processed=p.processed + 1)

    def _refresh(self, logged: LoggedRequest) -> str:
        gov, exact = self.gov, self.gov.exact
        key = exact.key_for(logged.request, tenant=logged.tenant, endpoint=logged.endpoint)
        if exact.backend.peek(key) is not None:
            gov.remember(logged.request, key, endpoint=logged.endpoint)  # log it, index it (best effort)
            return "already_fresh"
        if self._with_tenant:
            response = self.recompute(logged.request, logged.endpoint, tenant=logged.tenant)
        else:
            response = self.recompute(logged.request, logged.endpoint)
        if not cacheable_response(response, logged.endpoint):
            raise BackendError("the upstream returned an error or an incomplete answer")
        ttl = None if logged.expires is None else logged.expires - logged.created
        record = exact.make_record(
            key, logged.request, response, tenant=logged.tenant, user=logged.user, tags=logged.tags,
            ttl=ttl if ttl is None or ttl > 0 else None,
        )  # fmt: skip
        exact.backend.put(record)
        try:
            gov.log.remember(logged.request, record, endpoint=logged.endpoint)
            if gov.semantic is not None and logged.endpoint != "embeddings":
                # The answer's user owns the question vector a re-embedding caches (erasure).
                user = logged.user or None
                gov.semantic.add(logged.request, tenant=logged.tenant, response_key=key, user=user)
        except BaseException:
            self._undo(key, logged.tenant)
            raise
        return "refreshed"

    def _undo(self, key: str, tenant: str) -> None:
        """Remove whatever of one entry was written (each step on its own: one failing must not stop the
        others)."""
        steps: list[Callable[[], object]] = [
            lambda: self.gov.exact.backend.delete(key),
            lambda: self.gov.log.delete(key),
        ]
        if self.gov.semantic is not None:
            semantic = self.gov.semantic
            steps.append(lambda: semantic.remove_keys(tenant, [key]))
        for step in steps:
            try:
                step()
            except BackendError:
                self.gov.exact.metrics.error(LAYER, "backend")
