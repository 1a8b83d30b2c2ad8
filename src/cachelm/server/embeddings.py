"""``/v1/embeddings`` through the embedding cache: cached inputs are read, only the rest go upstream.

`semantic.embedding_cache.EmbeddingCache` is synchronous and takes an `Embedder`; here the embedder is the
upstream itself. `embed_many` runs in a worker thread and its embedder hands the missing texts back to the
event loop (`asyncio.run_coroutine_threadsafe`), so one upstream call carries every miss of a request.

An `EmbeddingCache` is keyed by the upstream model *and* the requested ``dimensions``. Its vector size is
learnt from the first answer of that model: until then (the first request per model after a start) every
input is computed, then stored. Token-id inputs are forwarded without caching.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from cachelm.errors import BackendError, ConfigError, TenantError
from cachelm.semantic.embedding_cache import EmbeddingCache
from cachelm.server.control import (
    DEFAULT_CONTROL,
    CacheControl,
    RequestError,
    embedding_inputs,
    parse_control,
    request_user,
)
from cachelm.server.proxy import JSON
from cachelm.server.runtime import Runtime
from cachelm.server.upstream import UpstreamError

MAX_MODELS = 64


class UpstreamEmbedder:
    """An `Embedder` whose vectors come from the upstream's ``/embeddings`` (called from a worker thread)."""

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = dim
        self.local = threading.local()  # .fetch: texts → (n, dim) float32, set per call by the caller

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.local.fetch(list(texts)), dtype=np.float32)


def decode_data(data: Any) -> np.ndarray:
    """(n, dim) float32 from an embeddings response's ``data`` (float lists or base64 float32)."""
    if not isinstance(data, list) or not data:
        raise UpstreamError("upstream embeddings answer has no `data`")
    rows = []
    for item in sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0):
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, str):
            try:  # not base64, or not a whole number of float32s: the upstream's fault (502), not ours
                rows.append(np.frombuffer(base64.b64decode(vector, validate=True), dtype="<f4"))
            except ValueError:
                raise UpstreamError("upstream embeddings answer has an invalid base64 `embedding`") from None
        elif isinstance(vector, list):
            rows.append(np.asarray(vector, dtype=np.float32))
        else:
            raise UpstreamError("upstream embeddings answer has an invalid `embedding`")
    if len({row.shape[0] for row in rows}) != 1:
        raise UpstreamError("upstream embeddings have different sizes")
    return np.stack(rows)


def encode_data(vectors: np.ndarray, encoding: str) -> list[dict[str, Any]]:
    out = []
    for i, vector in enumerate(vectors):
        value: Any = (
            base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
            if encoding == "base64"
            else vector.astype(float).tolist()
        )
        out.append({"object": "embedding", "index": i, "embedding": value})
    return out


class EmbeddingsService:
    """Per-(model, dimensions) embedding caches over the runtime's store."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # One cache per (model, dimensions), least recently used dropped first: model names come from
        # clients, so an unbounded dict would grow with every made-up name.
        self.caches: OrderedDict[str, EmbeddingCache] = OrderedDict()

    async def _upstream(self, body: dict[str, Any], texts: list[str], tenant: str) -> tuple[np.ndarray, int]:
        runtime = self.runtime
        runtime.proxy.upstream_calls += 1
        runtime.metrics.upstream_calls.labels("embeddings").inc()
        payload = {k: v for k, v in body.items() if k != "cache"}
        payload["input"] = texts
        status, raw = await runtime.upstream.post("embeddings", orjson.dumps(payload), tenant=tenant)
        if status != 200:
            raise UpstreamError(f"upstream answered {status}", status=status, body=raw)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream answered with invalid JSON") from None
        usage = answer.get("usage") if isinstance(answer, dict) else None
        tokens = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
        vectors = decode_data(answer.get("data") if isinstance(answer, dict) else None)
        if vectors.shape[0] != len(texts):
            raise UpstreamError(f"upstream answered {vectors.shape[0]} embeddings for {len(texts)} inputs")
        return vectors, int(tokens or 0)

    async def embed(
        self,
        body: dict[str, Any],
        texts: list[str],
        tenant: str,
        user: str = "",
        control: CacheControl = DEFAULT_CONTROL,
    ) -> tuple[np.ndarray, int, int]:
        """(vectors, hits, upstream prompt tokens) for `texts`; vectors stored are attributed to `user`
        and carry the request's `ttl` and `tags`; `refresh` recomputes them all and overwrites."""
        model_id = f"{body['model']}|dimensions={body.get('dimensions')}"
        cache = self.caches.get(model_id)
        if cache is not None:
            self.caches.move_to_end(model_id)
        loop = asyncio.get_running_loop()
        spent = [0]
        first = cache is None
        if cache is None:  # vector size unknown until the upstream has answered once: compute everything
            vectors, spent[0] = await self._upstream(body, texts, tenant)
            embedder = UpstreamEmbedder(model_id, int(vectors.shape[1]))
            cache = self.caches.setdefault(
                model_id, EmbeddingCache(self.runtime.store, embedder, ttl=self.runtime.config.default_ttl)
            )
            while len(self.caches) > MAX_MODELS:
                self.caches.popitem(last=False)
            primed = dict(zip(texts, vectors, strict=True))

            def fetch(missing: list[str]) -> np.ndarray:
                return np.stack([primed[t] for t in missing])

        else:
            dim = cache.dim

            def fetch(missing: list[str]) -> np.ndarray:
                vectors, used = asyncio.run_coroutine_threadsafe(
                    self._upstream(body, missing, tenant), loop
                ).result()
                spent[0] += used
                if vectors.shape[1] != dim:
                    raise UpstreamError(f"upstream embedding size changed from {dim} to {vectors.shape[1]}")
                return vectors

        batch = await asyncio.to_thread(_embed_many, cache, texts, tenant, user, fetch, control)
        return np.asarray(batch.vectors), 0 if first else batch.num_hits, spent[0]


def _embed_many(
    cache: EmbeddingCache, texts: list[str], tenant: str, user: str, fetch: Any, control: CacheControl
) -> Any:
    embedder = cache.embedder
    assert isinstance(embedder, UpstreamEmbedder)
    embedder.local.fetch = fetch  # thread-local: concurrent requests run in different worker threads
    return cache.embed_many(
        texts, tenant=tenant, user=user, ttl=control.ttl, tags=control.tags, refresh=control.refresh
    )


def embeddings_handler(runtime: Runtime) -> Any:
    from cachelm.server.app import bearer, error_response, parse_object, read_body, request_id_of

    service = runtime.embeddings = EmbeddingsService(runtime)

    async def handle(request: Request) -> Response:
        start = time.perf_counter()
        request_id = request_id_of(request)
        outcome, status = "error", 500
        try:
            tenant = runtime.registry.authenticate(bearer(request))
            raw = await read_body(request, runtime.config.max_body_bytes)
            body = parse_object(raw)
            texts = embedding_inputs(body)
            control = parse_control(request.headers, body)
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise RequestError(f"`encoding_format` must be 'float' or 'base64', got {encoding!r:.40}")
            headers = {"x-request-id": request_id}
            if texts is None or control.bypass:
                outcome = "bypass"
                runtime.proxy.upstream_calls += 1
                runtime.metrics.upstream_calls.labels("embeddings").inc()
                status, answer = await runtime.upstream.post(
                    "embeddings",
                    orjson.dumps({k: v for k, v in body.items() if k != "cache"}),
                    tenant=tenant.tenant_id,
                )
                response = Response(
                    answer,
                    status_code=status,
                    media_type=JSON,
                    headers={**headers, "x-cachelm-cache": "bypass"},
                )
            else:
                user = request_user(request.headers, body)
                vectors, hits, tokens = await service.embed(body, texts, tenant.tenant_id, user, control)
                outcome = "hit" if hits == len(texts) else "miss"
                answer_obj = {
                    "object": "list",
                    "data": encode_data(vectors, encoding),
                    "model": body["model"],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
                headers.update({"x-cachelm-cache": outcome, "x-cachelm-hits": f"{hits}/{len(texts)}"})
                response = Response(orjson.dumps(answer_obj), media_type=JSON, headers=headers)
        except RequestError as exc:
            response = error_response(
                exc.status, str(exc), kind="invalid_request_error", param=exc.param, request_id=request_id
            )
        except TenantError as exc:
            response = error_response(
                401, str(exc), kind="authentication_error", code="invalid_api_key", request_id=request_id
            )
        except ConfigError as exc:
            response = error_response(400, str(exc), kind="invalid_request_error", request_id=request_id)
        except UpstreamError as exc:
            response = Response(
                exc.body or orjson.dumps({"error": {"message": str(exc), "type": "upstream_error"}}),
                status_code=exc.status,
                media_type=JSON,
                headers={"x-request-id": request_id, **exc.headers},
            )
        except BackendError as exc:
            response = error_response(
                502, f"upstream failed: {exc}", kind="upstream_error", request_id=request_id
            )
        runtime.metrics.observe("embeddings", outcome, response.status_code, time.perf_counter() - start)
        return response

    return handle
