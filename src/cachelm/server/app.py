"""The ASGI app: routes, authentication, body limits, error shapes, access logs.

Starlette, not FastAPI: the hit path is a handful of microseconds of work, and FastAPI's dependency
injection and model validation would cost more than the cache lookup itself. Request bodies are validated
by hand (`control.py`) with messages that name the bad field; the OpenAPI document is written out in
`openapi.py` (served at ``/openapi.json`` and used by the fuzz tests).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cachelm.errors import ConfigError, TenantError
from cachelm.server.control import (
    RequestError,
    parse_control,
    request_user,
    validate_chat,
    validate_completion,
)
from cachelm.server.proxy import JSON, Call
from cachelm.server.runtime import Runtime
from cachelm.server.sse import ends_stream
from cachelm.server.upstream import UpstreamError

log = logging.getLogger("cachelm.server")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

Handler = Callable[[Request], Awaitable[Response]]


def error_response(
    status: int,
    message: str,
    *,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    request_id: str = "",
) -> Response:
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
    headers = {"x-request-id": request_id} if request_id else None
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def bearer(request: Request) -> str | None:
    """The API key of `request`: ``Authorization: Bearer <key>`` (or ``x-api-key``)."""
    value = request.headers.get("authorization")
    if value is not None:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("x-api-key")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (checked before and while reading)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise RequestError(
            f"request body exceeds the {limit} byte limit", status=413, code="payload_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                f"request body exceeds the {limit} byte limit", status=413, code="payload_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


MAX_DEPTH = 64  # nesting levels of a request body; far beyond any real tool schema


def _too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests deeper than `limit` (iterative: a deep body must not exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    if _too_deep(body, MAX_DEPTH):
        # Key computation walks the body recursively; refuse what would exhaust the stack there.
        raise RequestError(f"request body nests deeper than {MAX_DEPTH} levels")
    return body


_PROCESS_ID = uuid.uuid4().hex[:8]
_SEQUENCE = itertools.count(1)


def request_id_of(request: Request) -> str:
    """The client's ``x-request-id`` when well-formed, else ``<process id>-<sequence>`` (unique, cheap)."""
    given = request.headers.get("x-request-id")
    return given if given is not None and _REQUEST_ID.fullmatch(given) else f"{_PROCESS_ID}-{next(_SEQUENCE)}"


def completion_handler(runtime: Runtime, endpoint: str) -> Handler:
    validate = validate_chat if endpoint == "chat.completions" else validate_completion
    config, proxy, metrics = runtime.config, runtime.proxy, runtime.metrics

    async def handle(request: Request) -> Response:
        start = time.perf_counter()
        request_id = request_id_of(request)
        outcome, tenant_id = "error", "-"
        call: Call | None = None
        try:
            tenant = runtime.registry.authenticate(bearer(request))
            tenant_id = tenant.tenant_id
            raw = await read_body(request, config.max_body_bytes)
            body = parse_object(raw)
            validate(body)
            control = parse_control(request.headers, body)
            user = request_user(request.headers, body)
            call = Call(
                endpoint=endpoint,
                body=body,
                raw=raw,
                tenant=tenant,
                user=user,
                control=control,
                request_id=request_id,
                start=start,
            )
            response, outcome = await proxy.complete(call)
        except RequestError as exc:
            response = error_response(
                exc.status,
                str(exc),
                kind="invalid_request_error",
                param=exc.param,
                code=exc.code,
                request_id=request_id,
            )
        except TenantError as exc:
            response = error_response(
                401, str(exc), kind="authentication_error", code="invalid_api_key", request_id=request_id
            )
        except ConfigError as exc:  # a value keys.py cannot canonicalise (non-finite number, …)
            response = error_response(400, str(exc), kind="invalid_request_error", request_id=request_id)

        def record(status: int) -> None:
            elapsed = time.perf_counter() - start
            metrics.observe(
                endpoint,
                outcome,
                status,
                elapsed,
                tokens=call.saved_tokens if call else 0,
                cost=call.saved_cost if call else 0.0,
            )
            if runtime.access_log is not None:
                runtime.access_log.write(
                    {
                        "msg": "request",
                        "request_id": request_id,
                        "tenant": tenant_id,
                        "endpoint": endpoint,
                        "cache": outcome,
                        "status": status,
                        "ms": round(1000 * elapsed, 3),
                    },
                )

        if isinstance(response, StreamingResponse):  # recorded when the stream ends, as it ended
            response.body_iterator = _recorded(response.body_iterator, record)
        else:
            record(response.status_code)
        return response

    return handle


async def _recorded(frames: AsyncIterable[Any], record: Callable[[int], None]) -> AsyncIterator[Any]:
    """`frames`, then `record` with the stream's real status: its headers said 200 before it ran, but an
    error event ends a failed stream (502), and a client that went away before the end is a 499 (nginx's
    "client closed request"). Latency is then the whole stream's, as for a non-streaming answer."""
    status = 499
    try:
        async for chunk in frames:
            done, failed = ends_stream(chunk) if isinstance(chunk, bytes) else (False, False)
            if failed:
                status = 502
            elif done and status == 499:
                status = 200  # whole: a client that leaves right after reading it is no 499
            yield chunk
        if status == 499:
            status = 200
    finally:
        record(status)


def build_app(runtime: Runtime) -> Starlette:
    """The Starlette app serving `runtime` (see `runtime.build_runtime`)."""
    from cachelm.server import admin
    from cachelm.server.embeddings import embeddings_handler
    from cachelm.server.openapi import openapi_document

    document = orjson.dumps(openapi_document())

    async def models(request: Request) -> Response:
        try:
            runtime.registry.authenticate(bearer(request))
        except TenantError as exc:
            return error_response(401, str(exc), kind="authentication_error", code="invalid_api_key")
        try:
            listing = await runtime.models()
        except UpstreamError as exc:
            if exc.body:
                return Response(exc.body, status_code=exc.status, media_type=JSON, headers=exc.headers)
            return error_response(exc.status, str(exc), kind="upstream_error")
        return Response(orjson.dumps(listing), media_type=JSON)

    async def healthz(request: Request) -> Response:
        report = await runtime.health()
        return Response(
            orjson.dumps(report), status_code=200 if report["status"] != "down" else 503, media_type=JSON
        )

    async def metrics_route(request: Request) -> Response:
        return Response(runtime.cache.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Response:
        return Response(document, media_type=JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.aclose()

    routes = [
        Route("/v1/chat/completions", completion_handler(runtime, "chat.completions"), methods=["POST"]),
        Route("/v1/completions", completion_handler(runtime, "completions"), methods=["POST"]),
        Route("/v1/embeddings", embeddings_handler(runtime), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *admin.routes(runtime),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error_response(
            status,
            f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
            kind="invalid_request_error",
        )

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    from starlette.exceptions import HTTPException

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found, Exception: internal},
    )
