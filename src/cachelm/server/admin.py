"""The admin API and the dashboard page. Every ``/admin/*`` call needs an admin key.

- ``GET  /admin/stats``        cache and server counters, entries stored, uptime
- ``GET  /admin/timeseries``   the dashboard's buckets (hit rate, latency, savings over time)
- ``GET  /admin/entries``      the entry browser: ``?tenant=&limit=`` → metadata of stored entries
- ``POST /admin/purge``        ``{"tenant", "user", "tag", "model", "older_than"}`` → ``{"deleted": n}``
- ``POST /admin/erase``        ``{"tenant", "user"?}``: right to erasure for one user, or a whole tenant
- ``POST /admin/refresh``      ``{"model", "revision", "budget" | "budget_usd", "tenant"?}``: switch a model's
                               revision, recompute its most valuable answers (`server.revisions`) → 202
- ``GET  /admin/refresh``      the refresh job's progress, and the revisions in force
- ``GET  /dashboard``          the dashboard page (static; it asks for the admin key and calls the API)

Purges also drop the matching entries from every replica's L1 (pub/sub) and from the semantic index.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from cachelm.errors import BackendError, ConfigError
from cachelm.governance.journal import REQUEST_TAG, is_log_key
from cachelm.keys import semantic_query
from cachelm.server.proxy import JSON
from cachelm.server.revisions import RefreshBusy
from cachelm.server.runtime import Runtime
from cachelm.store.base import Match

MAX_ENTRIES = 500


def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type=JSON)


def _error(status: int, message: str) -> Response:
    return _json(
        {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}},
        status,
    )


def routes(runtime: Runtime) -> list[Route]:
    from cachelm.server.app import bearer

    def guard(request: Request) -> Response | None:
        if runtime.registry.is_admin(bearer(request) or request.headers.get("x-cachelm-admin-key")):
            return None
        return _error(403, "admin key required: send `Authorization: Bearer <admin key>`")

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > 65_536:
            raise ConfigError("admin request body exceeds 64 KiB")
        data = orjson.loads(raw or b"{}")
        if not isinstance(data, dict):
            raise ConfigError("admin request body must be a JSON object")
        return data

    async def stats(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied

        def count() -> tuple[int | None, int | None]:
            # Request-log records (governance) sit beside the answers; they are not entries.
            logged = sum(1 for _ in runtime.records.scan(Match(tag=REQUEST_TAG)))
            return len(runtime.records) - logged, logged

        try:
            entries, logged = await asyncio.to_thread(count)
        except BackendError:
            entries = logged = None
        return _json(
            {
                "cache": runtime.cache.metrics.snapshot(),
                "requests": runtime.metrics.totals,
                "upstream_calls": runtime.proxy.upstream_calls,
                "entries": entries,
                "logged_requests": logged,
                "tenants": runtime.registry.tenant_ids(),
                "uptime_s": time.time() - runtime.metrics.started,
                "origin": runtime.origin,
            }
        )

    async def timeseries(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        return _json(
            {"interval_s": runtime.metrics.series.interval_s, "points": runtime.metrics.series.points()}
        )

    async def entries(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        tenant = request.query_params.get("tenant") or None
        try:
            limit = min(MAX_ENTRIES, max(1, int(request.query_params.get("limit", "100"))))
        except ValueError:
            return _error(400, "`limit` must be an integer")

        def browse() -> list[dict[str, Any]]:
            now = time.time()
            out = []
            answers = (
                r
                for r in runtime.records.scan(Match(tenant=tenant) if tenant else None)
                if not is_log_key(r.key)
            )
            for record in itertools.islice(answers, limit):
                out.append(
                    {
                        "key": record.key[:16],
                        "tenant": record.tenant,
                        "user": record.user,
                        "model": record.model,
                        "tags": sorted(record.tags),
                        "age_s": round(now - record.created, 1),
                        "hits": record.hits,
                        "bytes": record.size,
                        "expires_in_s": None if record.expires is None else round(record.expires - now, 1),
                    }
                )
            return out

        try:
            return _json({"tenant": tenant, "entries": await asyncio.to_thread(browse)})
        except BackendError as exc:
            return _error(503, f"store unavailable: {exc}")

    def _answers_of(spec: dict[str, Any]) -> dict[str, list[str]]:
        """Response keys, by tenant, of the answers a purge/erase `spec` is about to delete.

        Only the semantic layer needs them: without one this returns ``{}`` and scans nothing.
        """
        if runtime.semantic is None:
            return {}
        where = runtime.cache.purge_match(**spec)  # exactly what the purge will delete (validated there)
        out: dict[str, list[str]] = {}
        for record in runtime.records.scan(where):
            if not is_log_key(record.key):
                out.setdefault(record.tenant, []).append(record.key)
        return out

    def _forget_embeddings(doomed: dict[str, list[str]]) -> None:
        """Delete the cached embeddings of the questions behind `doomed` answers (found in the request log).

        Without the request log the questions are unknown here; the vectors a user's own requests cached
        are attributed to them and go with the purge by user anyway.
        """
        log = runtime.proxy.request_log
        if runtime.semantic is None or log is None:
            return
        for tenant, keys in doomed.items():
            for key in keys:
                logged = log.get(key, tenant=tenant)
                query = None if logged is None else semantic_query(logged.request, tenant_salt=b"")
                if query is not None:
                    runtime.records.delete(runtime.semantic.embeddings.key(query.text, tenant=tenant))

    def _unindex(doomed: dict[str, list[str]]) -> None:
        if runtime.semantic is not None:
            for tenant, keys in doomed.items():
                runtime.semantic.remove_keys(tenant, keys)

    def _purge(spec: dict[str, Any]) -> int:
        doomed = _answers_of(spec)
        deleted = runtime.cache.purge(**spec)
        _unindex(doomed)
        return deleted

    def _erase(tenant: str, user: str | None) -> dict[str, int]:
        """Erase a whole tenant (`user` None) or one user of it: answers, semantic vectors and, with the
        local engine, the KV blocks of the tenant's prompts (keyed per tenant: a user takes them all)."""
        erase_kv = getattr(runtime.upstream, "erase_tenant_kv", None)
        counts = {"deleted": _erase_answers(tenant, user)}
        if erase_kv is not None:
            counts["kv_blocks"] = erase_kv(tenant)
        return counts

    def _erase_answers(tenant: str, user: str | None) -> int:
        if user is None:
            deleted = runtime.cache.erase_tenant(tenant)
            if runtime.semantic is not None:
                runtime.semantic.remove_tenant(tenant)
            return deleted
        # The user's vectors are derived from their questions: they go with the answers.
        doomed = _answers_of({"tenant": tenant, "user": user})
        _forget_embeddings(doomed)  # reads the request log: before erasing
        deleted = runtime.cache.erase_user(tenant, user)
        _unindex(doomed)
        return deleted

    async def purge(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        try:
            spec = await body_of(request)
            unknown = set(spec) - {"tenant", "user", "tag", "model", "older_than"}
            if unknown:
                raise ConfigError(f"unknown purge fields: {sorted(unknown)}")
            deleted = await asyncio.to_thread(_purge, spec)
        except (ConfigError, orjson.JSONDecodeError, TypeError) as exc:
            return _error(400, str(exc))
        except BackendError as exc:
            return _error(503, f"store unavailable: {exc}")
        await runtime.invalidate(
            tenant=spec.get("tenant"), user=spec.get("user"), all=bool(set(spec) - {"tenant", "user"})
        )
        return _json({"deleted": deleted})

    async def erase(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        try:
            spec = await body_of(request)
            tenant, user = spec.get("tenant"), spec.get("user")
            if not isinstance(tenant, str) or not tenant:
                raise ConfigError(f"`tenant` must be a non-empty string, got {tenant!r}")
            counts = await asyncio.to_thread(_erase, tenant, user)
        except (ConfigError, orjson.JSONDecodeError) as exc:
            return _error(400, str(exc))
        except BackendError as exc:
            return _error(503, f"store unavailable: {exc}")
        await runtime.invalidate(tenant=tenant, user=user)
        return _json(counts)

    async def refresh(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        try:
            progress = await runtime.revisions.refresh(await body_of(request))
        except RefreshBusy as exc:
            return _error(409, str(exc))
        except (ConfigError, orjson.JSONDecodeError) as exc:
            return _error(400, str(exc))
        except BackendError as exc:
            return _error(503, f"store unavailable: {exc}")
        return _json({"refresh": progress, "revisions": runtime.revisions.current}, 202)

    async def refresh_progress(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        return _json({"refresh": runtime.revisions.progress(), "revisions": runtime.revisions.current})

    page = resources.files("cachelm.server").joinpath("static/dashboard.html").read_text(encoding="utf-8")

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(page)

    return [
        Route("/admin/stats", stats, methods=["GET"]),
        Route("/admin/timeseries", timeseries, methods=["GET"]),
        Route("/admin/entries", entries, methods=["GET"]),
        Route("/admin/purge", purge, methods=["POST"]),
        Route("/admin/erase", erase, methods=["POST"]),
        Route("/admin/refresh", refresh, methods=["POST"]),
        Route("/admin/refresh", refresh_progress, methods=["GET"]),
        Route("/dashboard", dashboard, methods=["GET"]),
    ]
