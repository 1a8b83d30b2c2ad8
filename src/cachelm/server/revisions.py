"""Model revisions behind the proxy: the switch, the refresh job, and every replica's view of them.

A model's revision is part of the keys of its answers, exact and semantic (`ExactCache.model_revisions`,
`SemanticCache`), so an answer of an old revision is never served once the revision changes.
``--model-revision MODEL=REV`` sets revisions at start; ``POST /admin/refresh`` switches one on a running
proxy and recomputes the most valuable old answers through the proxy's own upstream
(`cachelm.governance.refresh`: the old answers leave the store at once, the best ones come back under
the new key as the background job reaches them, the rest are dropped). Serving goes on throughout: a
request whose answer is not refreshed yet is a miss, answered by the new model and stored under the new
key.

Shared mode (Redis): the replica that switches writes the revision into the hash
``<namespace>:revisions`` and announces it on the invalidation channel; every replica applies an
announcement when it arrives, and reads the hash when it starts and after each reconnect (announcements
sent while it was disconnected are lost). The hash wins over ``--model-revision``: a replica restarted with
an old flag must not go back to an old revision. Until a replica has heard of a switch (milliseconds on
a live channel) it keys by the old revision, so it may store a few answers under old keys; those are never
served after the switch and leave with their TTL or a purge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from cachelm.errors import BackendError, ConfigError
from cachelm.governance.core import Governance
from cachelm.governance.refresh import RefreshJob
from cachelm.server.proxy import PATHS
from cachelm.server.upstream import UpstreamError

if TYPE_CHECKING:
    from cachelm.server.runtime import Runtime

log = logging.getLogger("cachelm.server")

UPSTREAM_PATHS = {**PATHS, "embeddings": "embeddings"}
REFRESH_FIELDS = {"model", "revision", "budget", "budget_usd", "tenant"}
NOT_SENT_UPSTREAM = ("stream", "stream_options", "cache")  # a recomputation is one plain JSON answer


def parse_refresh(spec: Mapping[str, Any]) -> tuple[str, str, int | float, str | None]:
    """``(model, revision, budget, tenant)`` of a ``POST /admin/refresh`` body; `ConfigError` names the
    field at fault. ``budget`` counts upstream calls, ``budget_usd`` estimated dollars: one of the two."""
    unknown = set(spec) - REFRESH_FIELDS
    if unknown:
        raise ConfigError(f"unknown refresh fields: {sorted(unknown)}")
    model, revision, tenant = spec.get("model"), spec.get("revision"), spec.get("tenant")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"`model` must be a non-empty string, got {model!r}")
    if not isinstance(revision, str):
        raise ConfigError(f"`revision` must be a string, got {revision!r}")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise ConfigError(f"`tenant` must be a non-empty string or absent, got {tenant!r}")
    if ("budget" in spec) == ("budget_usd" in spec):
        raise ConfigError("give exactly one of `budget` (upstream calls) and `budget_usd` (dollars)")
    budget: int | float
    if "budget" in spec:
        budget = spec["budget"]
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"`budget` must be an integer >= 0, got {budget!r}")
    else:
        usd = spec["budget_usd"]
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd) or usd < 0:
            raise ConfigError(f"`budget_usd` must be a finite number >= 0, got {usd!r}")
        budget = float(usd)
    return model, revision, budget, tenant


class Revisions:
    """The proxy's model revisions and its refresh job (at most one at a time)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.job: RefreshJob | None = None
        self._hash = f"{runtime.config.namespace}:revisions"

    @property
    def current(self) -> dict[str, str]:
        return dict(self.runtime.cache.model_revisions)

    # -- shared mode -----------------------------------------------------------------------------------

    async def load(self) -> None:
        """Take the revisions recorded in Redis (shared mode); a failure keeps what this replica has."""
        redis = self.runtime.redis
        if redis is None:
            return
        try:
            recorded = await redis.hgetall(self._hash)
        except Exception as exc:  # any client error: Redis is down, the replica keeps its own view
            log.warning("model revisions not read from Redis", extra={"error": f"{type(exc).__name__}"})
            return
        for raw_model, raw_revision in recorded.items():
            self._apply(_text(raw_model), _text(raw_revision))

    def receive(self, message: Mapping[str, object]) -> bool:
        """Apply a revision announcement of another replica; False when `message` is not one."""
        switch = message.get("revision")
        if not (isinstance(switch, list) and len(switch) == 2 and all(isinstance(x, str) for x in switch)):
            return False
        self._apply(str(switch[0]), str(switch[1]))
        return True

    def _apply(self, model: str, revision: str) -> None:
        revisions = self.runtime.cache.model_revisions
        if revisions.get(model) != revision:
            log.info("model revision", extra={"model": model, "revision": revision})
            revisions[model] = revision  # one dict item: atomic for the threads that read keys

    async def _announce(self, model: str, revision: str) -> None:
        runtime = self.runtime
        if runtime.redis is None or runtime.invalidator is None:
            return
        try:
            await runtime.redis.hset(self._hash, model, revision)
        except Exception as exc:  # the switch stands here; a restarted replica would miss it: say so
            log.warning("model revision not recorded in Redis", extra={"error": f"{type(exc).__name__}"})
        await runtime.invalidator.publish({"origin": runtime.origin, "revision": [model, revision]})

    # -- refresh ---------------------------------------------------------------------------------------

    async def refresh(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Switch a model's revision and start refreshing its answers; the job's first progress report.

        Raises `ConfigError` for a bad body or while another refresh runs (`RefreshBusy`), `BackendError`
        when the store fails during planning (the revision has switched then; run it again to plan)."""
        model, revision, budget, tenant = parse_refresh(spec)
        if self.job is not None and self.job.progress.state in ("planned", "running"):
            raise RefreshBusy(f"a refresh of {self.job.plan.model!r} is still running")
        runtime = self.runtime
        semantic = runtime.semantic.default if runtime.semantic is not None else None
        gov = Governance(runtime.cache, semantic=semantic, log=runtime.proxy.request_log)
        recompute = self._recompute(asyncio.get_running_loop())
        # Switch every replica first, then plan: planning deletes the old answers from the shared store,
        # and a replica still keying by the old revision would serve them from its L1 meanwhile. A run for
        # the revision already in force keeps unlogged answers (they may be new ones: `switched_at` None).
        already = runtime.cache.model_revisions.get(model) == revision
        switched_at = None if already else runtime.cache.clock()
        self._apply(model, revision)
        await self._announce(model, revision)
        job = await asyncio.to_thread(
            gov.refresh_on_model_change, model, revision, recompute=recompute, budget=budget, tenant=tenant,
            switched_at=switched_at, start=False,
        )  # fmt: skip
        self.job = job
        job.start()
        return dataclasses.asdict(job.progress)

    def progress(self) -> dict[str, Any] | None:
        return None if self.job is None else dataclasses.asdict(self.job.progress)

    def _recompute(self, loop: asyncio.AbstractEventLoop) -> Callable[..., Mapping[str, Any]]:
        """A recompute for the job's thread: one call of the proxy's upstream, on the server's loop."""
        upstream, timeout = self.runtime.upstream, self.runtime.config.upstream_timeout_s
        calls = self.runtime.metrics.upstream_calls

        def recompute(request: Mapping[str, Any], endpoint: str, *, tenant: str) -> Mapping[str, Any]:
            body = orjson.dumps({k: v for k, v in request.items() if k not in NOT_SENT_UPSTREAM})
            calls.labels(endpoint).inc()
            future = asyncio.run_coroutine_threadsafe(
                upstream.post(UPSTREAM_PATHS[endpoint], body, tenant=tenant), loop
            )
            try:
                status, raw = future.result(timeout + 5)
            except concurrent.futures.TimeoutError:
                future.cancel()  # the call must not outlive its entry
                raise UpstreamError("upstream timed out", status=504) from None
            if status != 200:
                raise UpstreamError(f"upstream answered {status}", status=502)
            answer = orjson.loads(raw)
            if not isinstance(answer, dict):
                raise BackendError("upstream answered with a JSON value that is not an object")
            return answer

        return recompute

    def cancel(self) -> None:
        """Stop the job between entries (on shutdown); the entry in flight completes."""
        if self.job is not None:
            self.job.cancel()


class RefreshBusy(ConfigError):
    """A refresh was asked for while another one runs (HTTP 409)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
