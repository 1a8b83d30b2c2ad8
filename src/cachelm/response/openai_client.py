"""A caching wrapper for the official `openai` SDK (>= 1.0) clients, sync and async.

    client = cached(openai.OpenAI(), ExactCache(open_store("sqlite:///cache.db")), tenant="acme")
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[...], temperature=0)

``client.chat.completions.create``, ``client.completions.create`` and ``client.embeddings.create`` look the
request up first (embeddings never sample, so they are always cacheable):

- hit, ``stream`` false: the cached answer as the SDK's own model (`ChatCompletion` / `Completion`);
- hit, ``stream=True``: the cached answer replayed as a stream of `ChatCompletionChunk` (or `Completion`)
  objects (with a usage chunk when ``stream_options.include_usage`` is set);
- miss, ``stream`` false: the upstream call (concurrent identical calls make one, see `ExactCache`), stored;
- miss, ``stream=True``: the upstream stream passed through chunk by chunk while being recorded; the
  answer is stored only when the stream completed (every choice finished). A stream that breaks or that
  the caller stops reading early is never cached. Streams are not coalesced across callers. The upstream
  is asked for its usage chunk (``stream_options.include_usage``) even when the caller did not ask, so the
  stored answer carries its token counts (hits credit them as savings); the chunk is not passed to a
  caller that did not ask for it. ``stream_usage=False`` turns this off for upstreams that refuse it.

Sampled requests (temperature > 0 or absent) go straight upstream unless ``allow_sampled=True``. Fields
passed in ``extra_body`` are part of the key (they change the answer); ``extra_headers``, ``extra_query``
and ``timeout`` are not. Every other attribute (``models``, ``with_raw_response``…) is the wrapped client's
own, uncached.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
import openai
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cachelm.errors import CacheLMError, ConfigError
from cachelm.response.exact import LAYER, ExactCache
from cachelm.response.streaming import assemble_chat, assemble_completion, chat_chunks, completion_chunks
from cachelm.store.base import DEFAULT_TENANT, check_ttl

T = TypeVar("T")

# Request options of the SDK that travel with the HTTP call but are not part of the answer.
_TRANSPORT = ("extra_headers", "extra_query", "extra_body", "timeout")


@dataclass(frozen=True, kw_only=True)
class _Endpoint:
    name: str  # "chat.completions" | "completions" | "embeddings"
    model: type[Any]  # SDK model of a full answer
    chunk_model: type[Any] | None = None  # SDK model of a stream chunk; None: the endpoint does not stream
    assemble: Callable[..., dict[str, Any] | None] | None = None
    replay: Callable[..., Iterator[dict[str, Any]]] | None = None
    deterministic: bool = False  # the answer never depends on sampling (embeddings)


CHAT = _Endpoint(
    name="chat.completions",
    model=ChatCompletion,
    chunk_model=ChatCompletionChunk,
    assemble=assemble_chat,
    replay=chat_chunks,
)
COMPLETIONS = _Endpoint(
    name="completions",
    model=Completion,
    chunk_model=Completion,
    assemble=assemble_completion,
    replay=completion_chunks,
)
EMBEDDINGS = _Endpoint(name="embeddings", model=CreateEmbeddingResponse, deterministic=True)


@dataclass(frozen=True, kw_only=True)
class _Settings:
    cache: ExactCache
    tenant: str
    user: str
    tags: tuple[str, ...]
    ttl: float | None
    allow_sampled: bool
    stream_usage: bool = True


def _given(value: Any) -> bool:
    return not isinstance(value, openai.NotGiven | openai.Omit)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # a pydantic model, e.g. a message object passed back in
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _jsonable(value: Any) -> Any:
    """SDK params may hold pydantic models or tuples; make them plain JSON values."""
    return json.loads(json.dumps(value, default=_plain))


def _materialise(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The SDK accepts any iterable of messages; a generator must be read once, for the key and the call."""
    messages = kwargs.get("messages")
    if messages is not None and not isinstance(messages, list | tuple):
        kwargs = {**kwargs, "messages": list(messages)}
    return kwargs


def request_of(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The cache request for SDK ``create`` keyword arguments: transport options out, ``extra_body`` in."""
    request = {k: v for k, v in kwargs.items() if k not in _TRANSPORT and _given(v)}
    extra = kwargs.get("extra_body")
    if isinstance(extra, Mapping):
        request.update(extra)
    try:
        out = _jsonable(request)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the request arguments must be JSON-serialisable: {exc}") from None
    assert isinstance(out, dict)
    return out


def _expected_choices(request: Mapping[str, Any]) -> int:
    n = request.get("n")
    return n if isinstance(n, int) and n > 0 else 1


def _include_usage(request: Mapping[str, Any]) -> bool:
    options = request.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def _with_usage(settings: _Settings, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(kwargs for the upstream, hide usage chunks)``: a recorded stream asks for the usage chunk so the
    stored answer has token counts; the caller gets it only if it asked."""
    if not settings.stream_usage or _include_usage(kwargs):
        return kwargs, False
    options = kwargs.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    return {**kwargs, "stream_options": {**options, "include_usage": True}}, True


def _usage_only(chunk: Any) -> bool:
    return not getattr(chunk, "choices", None) and getattr(chunk, "usage", None) is not None


class _Recorder:
    """Collects the chunks of a live stream and stores the answer once it completed."""

    def __init__(self, settings: _Settings, endpoint: _Endpoint, request: dict[str, Any]) -> None:
        self.settings, self.endpoint, self.request = settings, endpoint, request
        self.chunks: list[dict[str, Any]] = []
        self.done = False

    def add(self, chunk: Any) -> None:
        self.chunks.append(chunk.to_dict())

    def finish(self) -> None:
        """The stream ended normally: store the answer if it is complete. Never raises into the caller."""
        if self.done:
            return
        self.done = True
        s = self.settings
        assert self.endpoint.assemble is not None  # only streaming endpoints record
        response = self.endpoint.assemble(self.chunks, expected_choices=_expected_choices(self.request))
        if response is None:
            s.cache.metrics.bypass(LAYER, "incomplete_stream")
            return
        try:
            s.cache.store(
                self.request, response, tenant=s.tenant, user=s.user, tags=s.tags, ttl=s.ttl,
                endpoint=self.endpoint.name, allow_sampled=s.allow_sampled or self.endpoint.deterministic,
            )  # fmt: skip
        except CacheLMError:
            s.cache.metrics.error(LAYER, "store")


class RecordingStream(Generic[T]):
    """An SDK `Stream` passed through while recorded; iterate it like the original."""

    def __init__(self, stream: Any, recorder: _Recorder, *, hide_usage: bool = False) -> None:
        self._stream = stream
        self._iterator: Iterator[T] = iter(stream)
        self._recorder = recorder
        self._hide_usage = hide_usage  # the usage chunk was asked for the record only

    @property
    def response(self) -> Any:
        return self._stream.response

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while True:
            try:
                chunk = next(self._iterator)
            except StopIteration:
                self._recorder.finish()
                raise
            self._recorder.add(chunk)
            if not (self._hide_usage and _usage_only(chunk)):
                return chunk

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> RecordingStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRecordingStream(Generic[T]):
    """An SDK `AsyncStream` passed through while recorded; ``async for`` it like the original."""

    def __init__(self, stream: Any, recorder: _Recorder, *, hide_usage: bool = False) -> None:
        self._stream = stream
        self._iterator: AsyncIterator[T] = stream.__aiter__()
        self._recorder = recorder
        self._hide_usage = hide_usage

    @property
    def response(self) -> Any:
        return self._stream.response

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            try:
                chunk = await self._iterator.__anext__()
            except StopAsyncIteration:
                self._recorder.finish()
                raise
            self._recorder.add(chunk)
            if not (self._hide_usage and _usage_only(chunk)):
                return chunk

    async def close(self) -> None:
        await self._stream.close()

    async def __aenter__(self) -> AsyncRecordingStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _replayed_response() -> httpx.Response:
    """What a replayed stream offers as its HTTP response (the SDK's streams have one: code reading its
    status or headers must not break on a hit); ``x-cachelm-cache: hit`` says where the answer came from."""
    return httpx.Response(200, headers={"content-type": "text/event-stream", "x-cachelm-cache": "hit"})


class ReplayStream(Generic[T]):
    """A cached answer replayed as stream chunks, shaped like the SDK's `Stream`."""

    def __init__(self, chunks: Iterable[T]) -> None:
        self._chunks = iter(list(chunks))
        self.response = _replayed_response()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks = iter(())

    def __enter__(self) -> ReplayStream[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: TracebackType | None) -> None:
        self.close()


class AsyncReplayStream(Generic[T]):
    """A cached answer replayed as stream chunks, shaped like the SDK's `AsyncStream`."""

    def __init__(self, chunks: Iterable[T]) -> None:
        self._chunks = iter(list(chunks))
        self.response = _replayed_response()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self._chunks = iter(())

    async def __aenter__(self) -> AsyncReplayStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _replay_chunks(endpoint: _Endpoint, response: Mapping[str, Any], request: Mapping[str, Any]) -> list[Any]:
    assert endpoint.replay is not None and endpoint.chunk_model is not None  # a streaming endpoint
    chunks = endpoint.replay(response, include_usage=_include_usage(request))
    return [endpoint.chunk_model.construct(**c) for c in chunks]


class _CachedCreate:
    """Shared set-up of one ``create`` call; the sync and async resources differ only in how they call."""

    def __init__(self, resource: Any, settings: _Settings, endpoint: _Endpoint) -> None:
        self._resource = resource
        self._settings = settings
        self._endpoint = endpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resource, name)  # with_raw_response etc.: the SDK's own, uncached

    @property
    def _allow_sampled(self) -> bool:
        return self._settings.allow_sampled or self._endpoint.deterministic

    def _options(self) -> dict[str, Any]:
        s = self._settings
        return {
            "tenant": s.tenant, "user": s.user, "tags": s.tags, "ttl": s.ttl,
            "endpoint": self._endpoint.name, "allow_sampled": self._allow_sampled,
        }  # fmt: skip


class _SyncCreate(_CachedCreate):
    def create(self, **kwargs: Any) -> Any:
        """The SDK's ``create``, served from the cache when possible. See the module docstring."""
        kwargs = _materialise(kwargs)
        s, endpoint, request = self._settings, self._endpoint, request_of(kwargs)
        if not s.cache.eligible(request, allow_sampled=self._allow_sampled):
            return self._resource.create(**kwargs)
        if kwargs.get("stream") is True:
            hit = s.cache.lookup(request, tenant=s.tenant, endpoint=endpoint.name, allow_sampled=True)
            if hit is not None:
                return ReplayStream(_replay_chunks(endpoint, hit.response, request))
            upstream_kwargs, hide = _with_usage(s, kwargs)
            return RecordingStream[Any](
                self._resource.create(**upstream_kwargs), _Recorder(s, endpoint, request), hide_usage=hide
            )
        original: list[Any] = []

        def compute() -> dict[str, Any]:
            original.append(self._resource.create(**kwargs))
            result: dict[str, Any] = original[0].to_dict()
            return result

        response, _hit = s.cache.get_or_compute(request, compute, **self._options())
        return original[0] if original else endpoint.model.construct(**response)


class _AsyncCreate(_CachedCreate):
    async def create(self, **kwargs: Any) -> Any:
        """The SDK's ``create``, served from the cache when possible. See the module docstring."""
        kwargs = _materialise(kwargs)
        s, endpoint, request = self._settings, self._endpoint, request_of(kwargs)
        if not s.cache.eligible(request, allow_sampled=self._allow_sampled):
            return await self._resource.create(**kwargs)
        if kwargs.get("stream") is True:
            hit = s.cache.lookup(request, tenant=s.tenant, endpoint=endpoint.name, allow_sampled=True)
            if hit is not None:
                return AsyncReplayStream(_replay_chunks(endpoint, hit.response, request))
            upstream_kwargs, hide = _with_usage(s, kwargs)
            stream = await self._resource.create(**upstream_kwargs)
            return AsyncRecordingStream[Any](stream, _Recorder(s, endpoint, request), hide_usage=hide)
        original: list[Any] = []

        async def acompute() -> dict[str, Any]:
            original.append(await self._resource.create(**kwargs))
            result: dict[str, Any] = original[0].to_dict()
            return result

        call: Callable[[], Awaitable[dict[str, Any]]] = acompute
        response, _hit = await s.cache.aget_or_compute(request, call, **self._options())
        return original[0] if original else endpoint.model.construct(**response)


class _Chat:
    def __init__(self, completions: _CachedCreate, chat: Any) -> None:
        self.completions = completions
        self._chat = chat

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chat, name)


class CachedClient:
    """An OpenAI / AsyncOpenAI client whose chat and legacy completions go through an `ExactCache`."""

    def __init__(self, client: Any, settings: _Settings) -> None:
        create = _AsyncCreate if isinstance(client, openai.AsyncOpenAI) else _SyncCreate
        self._client = client
        self.settings = settings
        self.chat = _Chat(create(client.chat.completions, settings, CHAT), client.chat)
        self.completions = create(client.completions, settings, COMPLETIONS)
        self.embeddings = create(client.embeddings, settings, EMBEDDINGS)

    @property
    def cache(self) -> ExactCache:
        return self.settings.cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def cached(
    client: openai.OpenAI | openai.AsyncOpenAI,
    cache: ExactCache,
    *,
    tenant: str = DEFAULT_TENANT,
    user: str = "",
    tags: Iterable[str] = (),
    ttl: float | None = None,
    allow_sampled: bool = False,
    stream_usage: bool = True,
) -> CachedClient:
    """Wrap `client` so its chat and legacy completions are served from `cache` when possible.
    `stream_usage`: ask upstream streams for their usage chunk, to store token counts (module docstring)."""
    if not isinstance(client, openai.OpenAI | openai.AsyncOpenAI):
        raise ConfigError(
            f"`client` must be an openai.OpenAI or openai.AsyncOpenAI, got {type(client).__name__}"
        )
    if not isinstance(cache, ExactCache):
        raise ConfigError(f"`cache` must be an ExactCache, got {type(cache).__name__}")
    if not isinstance(tenant, str) or not tenant:
        raise ConfigError(f"`tenant` must be a non-empty string, got {tenant!r}")
    # Checked here, not left to ExactCache.store: there a bad value surfaces after the upstream call,
    # whose paid answer is then lost (or, for a stream, silently never cached).
    if not isinstance(user, str):
        raise ConfigError(f"`user` must be a string, got {user!r}")
    if isinstance(tags, str):
        raise ConfigError(f"`tags` must be an iterable of strings, not a string: {tags!r}")
    tags = tuple(tags)
    if not all(isinstance(tag, str) and tag for tag in tags):
        raise ConfigError(f"`tags` must be non-empty strings, got {tags!r}")
    if not isinstance(allow_sampled, bool):
        raise ConfigError(f"`allow_sampled` must be a bool, got {allow_sampled!r}")
    if not isinstance(stream_usage, bool):
        raise ConfigError(f"`stream_usage` must be a bool, got {stream_usage!r}")
    check_ttl(ttl)
    settings = _Settings(
        cache=cache, tenant=tenant, user=user, tags=tags, ttl=ttl, allow_sampled=allow_sampled,
        stream_usage=stream_usage,
    )  # fmt: skip
    return CachedClient(client, settings)
