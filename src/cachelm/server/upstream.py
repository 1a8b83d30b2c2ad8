"""Upstreams the proxy calls on a miss: any OpenAI-compatible HTTP endpoint, or the local engine.

An upstream answers two calls:

`tenant` is passed along for upstreams that keep per-tenant state (the local engine's KV prefix cache);
an HTTP upstream ignores it.

- ``post(path, body)`` → ``(status, body bytes)``: a non-streaming call. An HTTP upstream's error status
  raises ``UpstreamError`` carrying that status, its body and the headers a client backs off by
  (``retry-after``, ``retry-after-ms``, ``x-ratelimit-*``: the proxy passes them on, so the OpenAI SDK
  waits as the upstream asked; the local engine returns its refusals); transport failures (refused,
  timeout, reset) raise ``UpstreamError`` with the status the client should see (502, or 504 for a
  timeout). Nothing that is not a 200 is ever cached.
- ``stream(path, body)`` → an async iterator over SSE ``data:`` payloads (bytes, ``[DONE]`` included). An
  error status before the first event raises ``UpstreamError`` carrying the upstream's status and body; a
  stream cut mid-way raises ``UpstreamError`` from the iterator, so the caller knows it is incomplete. The
  read timeout bounds the wait for each *data* line (504): keep-alive comments alone do not hold a stream
  open, since the proxy's flight for that key would never end and every identical request would join it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from cachelm.errors import BackendError, ConfigError


class UpstreamError(BackendError):
    """The upstream failed; `status`, `body` and `headers` are what the client is told."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


def passed_on(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an upstream error that tell a client when to retry (rate limits, overload)."""
    return {
        name.lower(): value
        for name, value in headers.items()
        if name.lower() in ("retry-after", "retry-after-ms") or name.lower().startswith("x-ratelimit-")
    }


def _refused(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    return UpstreamError(f"upstream answered {status}", status=status, body=body, headers=passed_on(headers))


class Upstream(Protocol):
    """What the proxy needs from whatever computes a miss."""

    name: str

    async def post(self, path: str, body: bytes, *, tenant: str = "default") -> tuple[int, bytes]: ...

    def stream(self, path: str, body: bytes, *, tenant: str = "default") -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


def http_upstream(
    base_url: str, *, api_key: str | None = None, read_timeout: float = 120.0
) -> AiohttpUpstream | HTTPUpstream:
    """The fastest HTTP upstream available: aiohttp when installed, else httpx.

    Why two: on a 2-core machine httpx's pure-Python HTTP/1.1 stack costs about 2 ms per call on loopback
    against 0.3 ms for aiohttp's C parser (measured in benchmarks/proxy_load.py's set-up), which alone
    would miss the 2 ms miss-overhead target. httpx stays as the fallback: it is a dependency anyway.
    """
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return HTTPUpstream(base_url, api_key=api_key, read_timeout=read_timeout)
    return AiohttpUpstream(base_url, api_key=api_key, read_timeout=read_timeout)


def public_url(url: str) -> str:
    """`url` without credentials or query (``https://user:key@host/v1?k=…`` → ``https://host/v1``): what
    `/healthz` and the logs show of the upstream, to anyone who can reach them."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal goes back in brackets
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class AiohttpUpstream:
    """An OpenAI-compatible endpoint over HTTP with a pooled `aiohttp.ClientSession` (made on first use,
    inside the serving event loop)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        max_connections: int = 256,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"`upstream` must be an http(s) URL, got {base_url!r}")
        if read_timeout <= 0 or connect_timeout <= 0:
            raise ConfigError(f"timeouts must be > 0, got {connect_timeout!r}/{read_timeout!r}")
        self._base = base_url.rstrip("/")
        self.name = public_url(self._base)
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeouts = (connect_timeout, read_timeout)
        self._max_connections = max_connections
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            connect, read = self._timeouts
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read),
                headers=self._headers,
            )
        return self._session

    async def post(self, path: str, body: bytes, *, tenant: str = "default") -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._client().post(f"{self._base}/{path}", data=body) as response:
                answer = await response.read()
                if response.status != 200:
                    raise _refused(response.status, answer, response.headers)
                return response.status, answer
        except TimeoutError as exc:
            raise UpstreamError("upstream timed out", status=504) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}: {exc}") from exc

    async def get(self, path: str) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._client().get(f"{self._base}/{path}") as response:
                answer = await response.read()
                if response.status != 200:
                    raise _refused(response.status, answer, response.headers)
                return response.status, answer
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}: {exc}") from exc

    async def stream(self, path: str, body: bytes, *, tenant: str = "default") -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async with self._client().post(f"{self._base}/{path}", data=body) as response:
                if response.status != 200:
                    raise _refused(response.status, await response.read(), response.headers)
                last_data = time.monotonic()
                async for line in response.content:
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
                        last_data = time.monotonic()
                    elif time.monotonic() - last_data > self._timeouts[1]:
                        raise UpstreamError(
                            "upstream stream timed out: no data, only keep-alives", status=504
                        )
        except TimeoutError as exc:
            raise UpstreamError("upstream stream timed out", status=504) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream stream cut: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class HTTPUpstream:
    """An OpenAI-compatible endpoint over HTTP with a pooled `httpx.AsyncClient`.

    `base_url` includes the version prefix, as the OpenAI SDK's ``base_url`` does
    (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"`upstream` must be an http(s) URL, got {base_url!r}")
        if read_timeout <= 0 or connect_timeout <= 0:
            raise ConfigError(f"timeouts must be > 0, got {connect_timeout!r}/{read_timeout!r}")
        self._base = base_url.rstrip("/")
        self.name = public_url(self._base)
        self._read_timeout = read_timeout
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=self._base + "/",
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def post(self, path: str, body: bytes, *, tenant: str = "default") -> tuple[int, bytes]:
        try:
            response = await self._client.post(path, content=body)
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"upstream timed out: {type(exc).__name__}", status=504) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise _refused(response.status_code, response.content, response.headers)
        return response.status_code, response.content

    async def get(self, path: str) -> tuple[int, bytes]:
        try:
            response = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise _refused(response.status_code, response.content, response.headers)
        return response.status_code, response.content

    async def stream(self, path: str, body: bytes, *, tenant: str = "default") -> AsyncIterator[bytes]:
        request = self._client.build_request("POST", path, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"upstream timed out: {type(exc).__name__}", status=504) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            if response.status_code != 200:
                raise _refused(response.status_code, await response.aread(), response.headers)
            last_data = time.monotonic()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip().encode()
                    last_data = time.monotonic()
                elif time.monotonic() - last_data > self._read_timeout:
                    raise UpstreamError("upstream stream timed out: no data, only keep-alives", status=504)
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"upstream stream timed out: {type(exc).__name__}", status=504) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream stream cut: {type(exc).__name__}: {exc}") from exc
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
