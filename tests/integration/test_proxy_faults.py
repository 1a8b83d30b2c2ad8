"""Upstream faults are never cached; bad requests are 4xx with a message naming the problem."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cachelm.server.config import ServerConfig
from cachelm.server.testing import ProxyThread
from cachelm.server.upstream import AiohttpUpstream, HTTPUpstream
from tests.upstream import OpenAIUpstream, chat_answer

CHAT = "/v1/chat/completions"


@pytest.fixture(params=["aiohttp", "httpx"])
def proxy(upstream: OpenAIUpstream, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyThread]:
    """The proxy with each HTTP upstream client: aiohttp (used when installed) and the httpx fallback."""
    if request.param == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        pytest.skip("aiohttp is not installed: the proxy uses its httpx client, tested by the other case")
    client_class = AiohttpUpstream if request.param == "aiohttp" else HTTPUpstream
    config = ServerConfig(
        upstream=upstream.base_url,
        store_url=f"sqlite:///{tmp_path}/cache.db",
        upstream_timeout_s=0.5,
        max_body_bytes=64 * 1024,
        access_log=False,
    )
    with ProxyThread(config, upstream=client_class(upstream.base_url, read_timeout=0.5)) as server:
        yield server


def client(proxy: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=10)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def outcome(c: openai.OpenAI, request: dict[str, Any]) -> str:
    return str(c.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"])


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_error_status_is_passed_through_and_not_cached(
    proxy: ProxyThread, upstream: OpenAIUpstream, status: int
) -> None:
    c = client(proxy)
    upstream.inject(f"status={status}")
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(**chat("fails once"))
    assert info.value.status_code == status
    assert outcome(c, chat("fails once")) == "miss"  # recomputed, not served from a cached error
    assert outcome(c, chat("fails once")) == "hit"
    assert upstream.count(CHAT) == 2


def test_timeout_is_504_and_not_cached(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    upstream.inject("delay=1.5")
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(**chat("slow"))
    assert info.value.status_code == 504 and "timed out" in info.value.message
    assert outcome(c, chat("slow")) == "miss"


@pytest.mark.parametrize("fault", ["cut=3", "truncate=3"])
def test_broken_stream_is_reported_and_not_cached(
    proxy: ProxyThread, upstream: OpenAIUpstream, fault: str
) -> None:
    c = client(proxy)
    request = chat("a stream that breaks in the middle of the answer")
    upstream.inject(fault)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in c.chat.completions.create(**request, stream=True):
            received.extend(ch.delta.content or "" for ch in chunk.choices)
    full = chat_answer(request)["choices"][0]["message"]["content"]
    assert "".join(received) != full  # the client saw a broken stream, and was told so
    assert outcome(c, request) == "miss"
    again = c.chat.completions.create(**request)
    assert again.choices[0].message.content == full
    assert upstream.count(CHAT) == 2


def test_stream_error_before_first_event_is_a_plain_http_error(
    proxy: ProxyThread, upstream: OpenAIUpstream
) -> None:
    c = client(proxy)
    upstream.inject("status=503")
    with pytest.raises(openai.InternalServerError):
        list(c.chat.completions.create(**chat("no stream"), stream=True))
    assert outcome(c, chat("no stream")) == "miss"


async def test_coalesced_waiters_of_a_failed_flight_get_the_error_then_recompute(
    proxy: ProxyThread, upstream: OpenAIUpstream
) -> None:
    upstream.inject("delay=0.3,status=503")
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/chat/completions", json=chat("together")) for _ in range(8))
        )
        assert [a.status_code for a in answers] == [503] * 8
        assert upstream.count(CHAT) == 1
        again = await http.post("/v1/chat/completions", json=chat("together"))
    assert again.status_code == 200 and again.headers["x-cachelm-cache"] == "miss"


def test_streaming_followers_receive_the_leaders_chunks_live(
    proxy: ProxyThread, upstream: OpenAIUpstream
) -> None:
    request = chat("one two three four five six seven eight nine ten")
    upstream.inject("chunk_delay=0.08")
    arrivals: dict[str, list[float]] = {"leader": [], "follower": []}
    texts: dict[str, str] = {}

    def consume(name: str, delay: float) -> None:
        time.sleep(delay)
        parts = []
        for chunk in client(proxy).chat.completions.create(**request, stream=True):
            arrivals[name].append(time.monotonic())
            parts.extend(ch.delta.content or "" for ch in chunk.choices)
        texts[name] = "".join(parts)

    threads = [threading.Thread(target=consume, args=("leader", 0.0)),
               threading.Thread(target=consume, args=("follower", 0.3))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expected = chat_answer(request)["choices"][0]["message"]["content"]
    assert texts == {"leader": expected, "follower": expected}
    assert upstream.count(CHAT) == 1
    # Live, not replayed afterwards: the follower (0.3 s late into a ~1.1 s stream) had its first chunk
    # before the leader had the middle one; a replay would only start once the whole answer was in.
    leader = arrivals["leader"]
    assert arrivals["follower"][0] < leader[len(leader) // 2]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"model": "m"}', 400, "`messages`"),
        (b'{"model": "m", "messages": []}', 400, "`messages` must be a non-empty list"),
        (b'{"model": "m", "messages": [{"role": "wizard"}]}', 400, "`messages[0].role`"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "`model`"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "`stream`"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "`n`"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "cache": 3}', 400, "`cache`"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}',
            413,
            "byte limit",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": '
            + b"[" * 1000
            + b"]" * 1000
            + b"}",
            400,
            "nests deeper",
        ),
    ],
)
def test_invalid_payloads_are_4xx_with_a_clear_message(
    proxy: ProxyThread, upstream: OpenAIUpstream, body: bytes, status: int, needle: str
) -> None:
    answer = httpx.post(
        proxy.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == status
    error = answer.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"
    assert upstream.count() == 0


def test_invalid_embeddings_and_unknown_routes(proxy: ProxyThread) -> None:
    bad = httpx.post(proxy.url + "/v1/embeddings", json={"model": "e", "input": [1, "a"]})
    assert bad.status_code == 400 and "`input`" in bad.json()["error"]["message"]
    missing = httpx.get(proxy.url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(proxy.url + "/v1/chat/completions")
    assert wrong_method.status_code == 405
