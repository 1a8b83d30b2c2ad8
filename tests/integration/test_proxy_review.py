"""Review of the proxy: answers that stream in shapes the plain test upstream never sends (refusals,
logprobs, long lines, malformed or short streams), upstream failures outside the completion path, and
metrics that must agree with what clients are told.

Everything runs over real TCP: the `openai` SDK → the proxy (`ProxyThread`) → `ScriptedUpstream`, the test
upstream of tests/upstream.py with some answers scripted per question.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cachelm.server.config import ServerConfig
from cachelm.server.testing import ProxyThread, free_port
from cachelm.server.upstream import AiohttpUpstream, HTTPUpstream
from tests.upstream import CREATED, OpenAIUpstream, _chat_chunks, _last_user_text, chat_answer

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
HEAD = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": CREATED, "model": MODEL}


@dataclass(frozen=True)
class KeepAlive:
    """In a script: SSE comments (``: keep-alive``) every 0.1 s for `seconds`, then the body just ends."""

    seconds: float


class ScriptedUpstream(OpenAIUpstream):
    """The test upstream, with scripted chat answers: a request whose last user text is a key of `streams`
    is answered, when it streams, with those SSE payloads (dicts are JSON-encoded) and ``[DONE]``; one whose
    text is a key of `answers` is answered, when it does not, with that JSON. Other requests: as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, list[Any]] = {}
        self.answers: dict[str, dict[str, Any]] = {}
        self.embedding_answers: dict[str, dict[str, Any]] = {}  # by the first input text

    async def _embeddings(self, request: Request) -> Response:
        body = json.loads(await request.body())
        inputs = body.get("input")
        first = inputs if isinstance(inputs, str) else (inputs or [""])[0]
        if isinstance(first, str) and first in self.embedding_answers:
            return JSONResponse(self.embedding_answers[first])
        return await super()._embeddings(request)

    async def _chat(self, request: Request) -> Response:
        body, fault = await self._receive(request)
        text = _last_user_text(body.get("messages"))
        if fault.status:
            return self._error(fault.status)
        if body.get("stream") and text in self.streams:
            script = self.streams[text]

            async def events() -> AsyncIterator[bytes]:
                for item in script:
                    if isinstance(item, KeepAlive):
                        for _ in range(int(item.seconds / 0.1)):
                            yield b": keep-alive\n\n"
                            await asyncio.sleep(0.1)
                        return
                    yield f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        if not body.get("stream") and text in self.answers:
            return JSONResponse(self.answers[text])
        if body.get("stream"):
            return self._stream(_chat_chunks(body), fault)
        return JSONResponse(chat_answer(body))


def chunk(delta: dict[str, Any], *, finish: str | None = None, logprobs: Any = None, index: int = 0) -> Any:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {**HEAD, "choices": [choice]}


def answer(message: dict[str, Any], *, logprobs: Any = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    server.start()
    yield server
    server.stop()


def serve(upstream: OpenAIUpstream, tmp_path: Path, client_class: type[Any] = AiohttpUpstream) -> ProxyThread:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False
    )
    return ProxyThread(config, upstream=client_class(upstream.base_url, read_timeout=5))


@pytest.fixture
def proxy(upstream: ScriptedUpstream, tmp_path: Path) -> Iterator[ProxyThread]:
    with serve(upstream, tmp_path, _client_class("aiohttp")) as server:
        yield server


def _client_class(name: str) -> type[Any]:
    if name == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        pytest.skip("aiohttp is not installed: the proxy uses its httpx client, tested by the other case")
    return AiohttpUpstream if name == "aiohttp" else HTTPUpstream


def client(proxy: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=20)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": text}], **extra}


def cache_header(c: openai.OpenAI, request: dict[str, Any]) -> str:
    return str(c.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"])


# -- what a streamed answer carries besides its content ----------------------------------------------------

REFUSAL = "I'm sorry, but I can't help with that request."


def test_streamed_refusal_is_recorded_and_served_by_hits(
    proxy: ProxyThread, upstream: ScriptedUpstream
) -> None:
    upstream.streams["how do I pick a lock"] = [
        chunk({"role": "assistant", "content": None, "refusal": ""}),
        chunk({"refusal": REFUSAL[:20]}),
        chunk({"refusal": REFUSAL[20:]}),
        chunk({}, finish="stop"),
    ]
    c = client(proxy)
    request = chat("how do I pick a lock")
    live = "".join(ch.delta.refusal or "" for part in c.chat.completions.create(**request, stream=True)
                   for ch in part.choices)  # fmt: skip
    assert live == REFUSAL
    raw = c.chat.completions.with_raw_response.create(**request)
    assert raw.headers["x-cachelm-cache"] == "hit"
    message = raw.parse().choices[0].message
    assert (message.refusal, message.content) == (REFUSAL, None)  # a refusal, not an empty answer
    replayed = "".join(ch.delta.refusal or "" for part in c.chat.completions.create(**request, stream=True)
                       for ch in part.choices)  # fmt: skip
    assert replayed == REFUSAL
    assert upstream.count(CHAT) == 1


def test_streamed_reasoning_content_is_recorded_and_served_by_hits(
    proxy: ProxyThread, upstream: ScriptedUpstream
) -> None:
    """Reasoning servers (DeepSeek, vLLM) stream it in `reasoning_content`: a hit must carry it too."""
    reasoning = "The user asks for 6 x 7. Six sevens are forty-two."
    upstream.streams["six times seven"] = [
        chunk({"role": "assistant", "content": "", "reasoning_content": reasoning[:20]}),
        chunk({"reasoning_content": reasoning[20:]}),
        chunk({"content": "42"}),
        chunk({}, finish="stop"),
    ]
    c = client(proxy)
    request = chat("six times seven")

    def streamed() -> tuple[str, str]:
        parts = [
            ch.delta for part in c.chat.completions.create(**request, stream=True) for ch in part.choices
        ]
        return "".join(getattr(d, "reasoning_content", None) or "" for d in parts), "".join(
            d.content or "" for d in parts
        )

    assert streamed() == (reasoning, "42")
    raw = c.chat.completions.with_raw_response.create(**request)
    assert raw.headers["x-cachelm-cache"] == "hit"
    message = raw.parse().choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (reasoning, "42")
    assert streamed() == (reasoning, "42")  # replayed from the cache
    assert upstream.count(CHAT) == 1


TOKENS = ["Par", "is", " is", " the", " capital"]


def _token_logprob(token: str, i: int) -> dict[str, Any]:
    return {"token": token, "logprob": -0.1 * i, "bytes": list(token.encode()), "top_logprobs": []}


def test_logprobs_survive_recording_and_replay(proxy: ProxyThread, upstream: ScriptedUpstream) -> None:
    entries = [_token_logprob(t, i) for i, t in enumerate(TOKENS)]
    upstream.streams["capital of France, streamed"] = [
        chunk({"role": "assistant", "content": ""}),
        *(
            chunk({"content": t}, logprobs={"content": [e], "refusal": None})
            for t, e in zip(TOKENS, entries, strict=True)
        ),
        chunk({}, finish="stop"),
    ]
    upstream.answers["capital of France, whole"] = answer(
        {"role": "assistant", "content": "".join(TOKENS)}, logprobs={"content": entries, "refusal": None}
    )
    c = client(proxy)
    # A streamed miss, then a plain hit: the hit carries the logprobs the stream had.
    streamed = chat("capital of France, streamed", logprobs=True)
    list(c.chat.completions.create(**streamed, stream=True))
    raw = c.chat.completions.with_raw_response.create(**streamed)
    assert raw.headers["x-cachelm-cache"] == "hit"
    hit = raw.parse().choices[0]
    assert hit.message.content == "".join(TOKENS)
    assert hit.logprobs is not None and [e.token for e in hit.logprobs.content or []] == TOKENS
    # A plain miss, then a streamed hit: the replay carries the stored logprobs.
    whole = chat("capital of France, whole", logprobs=True)
    c.chat.completions.create(**whole)
    replayed = [
        e.token
        for part in c.chat.completions.create(**whole, stream=True)
        for ch in part.choices
        for e in ((ch.logprobs.content or []) if ch.logprobs else [])
    ]
    assert replayed == TOKENS
    assert upstream.count(CHAT) == 2


# -- streams that are not whole answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        chunk("not an object"),  # type: ignore[arg-type]
        chunk({"content": ["a", "list"]}),
        chunk({"tool_calls": [{"index": 0, "function": "not an object"}]}),
    ],
    ids=["delta", "content", "tool_call"],
)
def test_malformed_chunk_mid_stream_is_reported_and_not_cached(
    proxy: ProxyThread, upstream: ScriptedUpstream, bad: Any
) -> None:
    upstream.streams["malformed"] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Half an"}),
        bad,
        chunk({"content": " answer"}),
        chunk({}, finish="stop"),
    ]
    c = client(proxy)
    with pytest.raises(openai.APIError):  # told, not handed a stream that simply stops
        list(c.chat.completions.create(**chat("malformed"), stream=True))
    assert cache_header(c, chat("malformed")) == "miss"
    assert upstream.count(CHAT) == 2


def test_stream_missing_one_of_n_choices_is_passed_on_but_not_cached(
    proxy: ProxyThread, upstream: ScriptedUpstream
) -> None:
    """n=2 asked; choice 1 never comes, yet [DONE] does. An upstream that ignores `n` does exactly this, so
    the client gets the stream as it came (as it would without the proxy), but it is never stored: it
    may equally be an answer that lost a choice."""
    upstream.streams["two answers please"] = [
        chunk({"role": "assistant", "content": "One"}),
        chunk({}, finish="stop"),
    ]
    c = client(proxy)
    request = chat("two answers please", n=2)
    chunks = list(c.chat.completions.create(**request, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "One"
    assert cache_header(c, request) == "miss"


# -- other upstream failures -------------------------------------------------------------------------------


def test_a_failed_model_listing_is_not_remembered(tmp_path: Path) -> None:
    port = free_port()
    upstream = OpenAIUpstream(port=port)
    config = ServerConfig(
        upstream=f"http://127.0.0.1:{port}/v1", store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False
    )
    with ProxyThread(config) as proxy:
        c = client(proxy)
        with pytest.raises(openai.APIStatusError) as info:  # upstream down: an error, not an empty list
            c.models.list()
        assert info.value.status_code == 502
        upstream.start()
        try:
            assert [m.id for m in c.models.list().data] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        finally:
            upstream.stop()


@pytest.mark.parametrize(
    "data",
    [
        [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],  # one vector for two inputs
        [{"object": "embedding", "index": i, "embedding": "AAA"} for i in range(2)],  # base64 of 2 bytes
    ],
    ids=["too-few", "bad-base64"],
)
def test_a_wrong_embeddings_answer_is_a_502_and_caches_nothing(
    proxy: ProxyThread, upstream: ScriptedUpstream, data: list[dict[str, Any]]
) -> None:
    upstream.embedding_answers["alpha"] = {"object": "list", "data": data, "model": "m", "usage": {}}
    c = client(proxy)
    with pytest.raises(openai.APIStatusError) as info:
        c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert info.value.status_code == 502  # the upstream's fault, not an internal error
    del upstream.embedding_answers["alpha"]
    raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert raw.headers["x-cachelm-cache"] == "miss" and len(raw.parse().data) == 2


# -- metrics agree with what clients are told ----------------------------------------------------------------


def _sample(proxy: ProxyThread, name: str, **labels: str) -> float:
    text = httpx.get(proxy.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_stream_is_counted_with_the_status_it_ended_with(
    proxy: ProxyThread, upstream: ScriptedUpstream
) -> None:
    """A stream's headers say 200 before it runs; the request metric waits for its end."""
    upstream.streams["cut short"] = [chunk({"role": "assistant", "content": "Half"}), {"choices": "x"}]
    upstream.streams["whole"] = [chunk({"role": "assistant", "content": "All"}), chunk({}, finish="stop")]
    series = "cachelm_server_requests_total"
    labels = {"endpoint": "chat.completions", "cache": "miss"}
    failed = _sample(proxy, series, status="502", **labels)
    ok = _sample(proxy, series, status="200", **labels)
    c = client(proxy)
    with pytest.raises(openai.APIError):
        list(c.chat.completions.create(**chat("cut short"), stream=True))
    list(c.chat.completions.create(**chat("whole"), stream=True))
    # Recorded as the server's stream generator finishes, just after the client read its end: poll.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        _sample(proxy, series, status="502", **labels),
        _sample(proxy, series, status="200", **labels),
    ) != (failed + 1, ok + 1):
        time.sleep(0.02)
    assert _sample(proxy, series, status="502", **labels) == failed + 1
    assert _sample(proxy, series, status="200", **labels) == ok + 1


def test_embeddings_forwarded_uncached_count_as_upstream_calls(
    proxy: ProxyThread, upstream: ScriptedUpstream
) -> None:
    before = _sample(proxy, "cachelm_server_upstream_calls_total", endpoint="embeddings")
    c = client(proxy)
    c.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3]])  # token ids: forwarded uncached
    c.embeddings.create(model="text-embedding-3-small", input="x", extra_headers={"x-cachelm-bypass": "on"})
    assert upstream.count("/v1/embeddings") == 2
    assert _sample(proxy, "cachelm_server_upstream_calls_total", endpoint="embeddings") == before + 2
    assert proxy.runtime.proxy.upstream_calls == 2


async def test_coalesced_answers_are_counted_as_the_hits_clients_are_told(
    proxy: ProxyThread, upstream: ScriptedUpstream
) -> None:
    upstream.inject("delay=0.5")
    async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as http:
        answers = await asyncio.gather(*(http.post(CHAT, json=chat("together")) for _ in range(4)))
    told = sorted(a.headers["x-cachelm-cache"] for a in answers)
    assert told == ["hit", "hit", "hit", "miss"] and upstream.count(CHAT) == 1
    requests = "cachelm_server_requests_total"
    labels = {"endpoint": "chat.completions", "status": "200"}
    assert _sample(proxy, requests, cache="miss", **labels) == 1
    assert _sample(proxy, requests, cache="hit", **labels) == 3


@pytest.mark.parametrize("client_name", ["aiohttp", "httpx"])
def test_a_stream_kept_alive_without_data_times_out_and_frees_its_key(
    upstream: ScriptedUpstream, tmp_path: Path, client_name: str
) -> None:
    # The upstream answers two words, then only keeps the connection alive (SSE comments) for 8 s: each
    # comment resets a socket read timeout, so without a limit on the wait for *data* the flight never
    # ends, and every later identical request joins it instead of asking the upstream again.
    upstream.streams["stalls"] = [
        chunk({"role": "assistant", "content": "Two"}),
        chunk({"content": " words"}),
        KeepAlive(8.0),
    ]
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False
    )
    with ProxyThread(
        config, upstream=_client_class(client_name)(upstream.base_url, read_timeout=0.5)
    ) as proxy:
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=4)
        with pytest.raises(openai.APIError) as info:
            list(c.chat.completions.create(**chat("stalls"), stream=True))
        # The proxy said so; the client did not have to wait for its own timeout.
        assert not isinstance(info.value, openai.APITimeoutError)
        assert "timed out" in info.value.message
        raw = c.chat.completions.with_raw_response.create(**chat("stalls"))  # a new flight, a whole answer
        assert raw.headers["x-cachelm-cache"] == "miss" and "x-cachelm-coalesced" not in raw.headers
        assert raw.parse().choices[0].message.content == f"Echo from {MODEL}: stalls"
        assert upstream.count(CHAT) == 2


def test_healthz_never_shows_the_upstream_s_credentials(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    """/healthz answers anyone: an upstream URL carrying a user, a password or a query key must not leak."""
    base = upstream.base_url.replace("http://", "http://svc:s3cret-pass@") + "?key=s3cret-query"
    config = ServerConfig(upstream=base, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False)
    with ProxyThread(config, upstream=AiohttpUpstream(base.split("?")[0], read_timeout=5)) as proxy:
        health = httpx.get(proxy.url + "/healthz").text
        assert "s3cret" not in health and "svc" not in health
        assert upstream.base_url.split("//")[1] in health  # host, port and path are still shown
        answer = client(proxy).chat.completions.create(**chat("still reachable?"))
        assert answer.choices[0].message.content  # requests still go to the URL as given


@pytest.mark.parametrize("client_class", ["aiohttp", "httpx"])
@pytest.mark.parametrize("path", ["miss", "stream-miss", "bypass", "stream-bypass", "embeddings"])
def test_a_rate_limit_reaches_the_client_with_its_retry_headers(
    upstream: ScriptedUpstream, tmp_path: Path, client_class: str, path: str
) -> None:
    """The OpenAI SDK waits as `retry-after(-ms)` says; the proxy dropped those headers (and the body on a
    bypass), so clients retried on their own schedule. Nothing of the refusal is cached."""
    with serve(upstream, tmp_path, _client_class(client_class)) as proxy:
        c = client(proxy)
        upstream.inject("status=429")
        bypass = {"x-cachelm-bypass": "on"} if "bypass" in path else {}
        with pytest.raises(openai.RateLimitError) as info:
            if path == "embeddings":
                c.embeddings.create(model="text-embedding-3-small", input=["limited"])
            elif path.startswith("stream"):
                list(c.chat.completions.create(**chat("limited"), stream=True, extra_headers=bypass))
            else:
                c.chat.completions.create(**chat("limited"), extra_headers=bypass)
        headers = info.value.response.headers
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("7", "7000")
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert info.value.code == "rate_limit_exceeded"  # the upstream's own body
        if path != "embeddings":
            raw = c.chat.completions.with_raw_response.create(**chat("limited"))
            assert raw.headers["x-cachelm-cache"] == "miss"  # the 429 was not stored


def test_embeddings_honour_ttl_tags_and_refresh(proxy: ProxyThread, upstream: ScriptedUpstream) -> None:
    """The cache controls were accepted on /v1/embeddings and ignored: vectors kept no tag and no lifetime
    (purge by tag missed them), and `refresh` only bypassed, leaving the old vectors in place."""
    from cachelm.store import Match

    c = client(proxy)
    ask = {"model": "text-embedding-3-small", "input": ["tagged text", "other text"]}
    c.embeddings.create(**ask, extra_headers={"x-cachelm-tags": "batch-7", "x-cachelm-ttl": "60"})
    stored = list(proxy.runtime.store.scan(Match(tag="batch-7")))
    assert len(stored) == 2
    assert all(r.expires is not None and abs(r.expires - r.created - 60) < 1e-6 for r in stored)
    calls = upstream.count("/v1/embeddings")
    raw = c.embeddings.with_raw_response.create(**ask, extra_headers={"x-cachelm-refresh": "on"})
    assert raw.headers["x-cachelm-cache"] == "miss" and upstream.count("/v1/embeddings") == calls + 1
    refreshed = {r.key: r for r in proxy.runtime.store.scan(Match(tag="embedding"))}
    assert all(refreshed[r.key].created > r.created for r in stored)  # overwritten, not left in place
    again = c.embeddings.with_raw_response.create(**ask)
    assert again.headers["x-cachelm-cache"] == "hit" and upstream.count("/v1/embeddings") == calls + 1
