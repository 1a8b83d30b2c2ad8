"""`http_recompute`: a `Recompute` that asks any OpenAI-compatible endpoint over HTTP (httpx).

Used by ``cachelm refresh --upstream URL``; library callers may pass any callable instead (an SDK client,
the local engine). A non-2xx answer, a body that is not a JSON object, or a network failure raises
`BackendError`, which the refresh job counts as a failed entry (nothing is cached for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from cachelm.errors import BackendError, ConfigError
from cachelm.governance.refresh import Recompute

PATHS = {"chat.completions": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


def http_recompute(
    base_url: str, *, api_key: str | None = None, timeout: float = 60.0, client: httpx.Client | None = None
) -> Recompute:
    """A recompute calling ``POST {base_url}/chat/completions`` (or ``/completions``, ``/embeddings``).

    `base_url` includes the API prefix, e.g. ``http://127.0.0.1:8000/v1``. Requests are sent without
    streaming, as stored. The returned callable is thread-safe (httpx clients are).
    """
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"`base_url` must be an http(s):// URL, got {base_url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"`timeout` must be a number of seconds > 0, got {timeout!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = client if client is not None else httpx.Client(timeout=timeout, headers=headers)
    root = base_url.rstrip("/")

    def recompute(request: Mapping[str, Any], endpoint: str) -> Mapping[str, Any]:
        path = PATHS.get(endpoint)
        if path is None:
            raise ConfigError(f"`endpoint` must be one of {tuple(PATHS)}, got {endpoint!r}")
        body = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
        try:
            answer = http.post(root + path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {root}{path}: {type(exc).__name__}: {exc}") from exc
        if answer.status_code // 100 != 2:
            raise BackendError(f"upstream {root}{path} answered HTTP {answer.status_code}")
        try:
            data = answer.json()
        except ValueError as exc:
            raise BackendError(f"upstream {root}{path} answered a body that is not JSON") from exc
        if not isinstance(data, dict):
            raise BackendError(f"upstream {root}{path} answered JSON that is not an object")
        return data

    return recompute
