"""The proxy end to end with the real `openai` SDK: hits equal recomputation, streaming both ways,
cache control, tenants, the admin API. Upstream: the real local OpenAI-protocol server (tests/upstream.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cachelm.server.config import ServerConfig
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.server.testing import ProxyThread
from tests.upstream import OpenAIUpstream, chat_answer, completion_answer, embedding_vector

ADMIN = "admin-secret-key"
KEYS = {"acme": "acme-key-123456", "globex": "globex-key-123456"}


def registry() -> TenantRegistry:
    return TenantRegistry.from_config(
        {
            "admin_keys": [hash_key(ADMIN)],
            "tenants": {name: {"keys": [hash_key(key)]} for name, key in KEYS.items()},
        }
    )


@pytest.fixture
def proxy(upstream: OpenAIUpstream, tmp_path: Path) -> Iterator[ProxyThread]:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False
    )
    with ProxyThread(config, registry()) as server:
        yield server


def client(proxy: ProxyThread, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=20)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def test_chat_hit_equals_recomputation(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    first = c.chat.completions.with_raw_response.create(**chat("what is 2+2?"))
    second = c.chat.completions.with_raw_response.create(**chat("what is 2+2?"))
    assert first.headers["x-cachelm-cache"] == "miss"
    assert second.headers["x-cachelm-cache"] == "hit"
    assert int(second.headers["x-cachelm-age"]) >= 0
    assert second.headers["x-request-id"]
    expected = chat_answer(chat("what is 2+2?"))  # what recomputation gives
    for raw in (first, second):
        got = raw.parse()
        assert got.id == expected["id"]
        assert [(ch.index, ch.message.content, ch.finish_reason) for ch in got.choices] == [
            (ch["index"], ch["message"]["content"], ch["finish_reason"]) for ch in expected["choices"]
        ]
        assert got.usage is not None and got.usage.total_tokens == expected["usage"]["total_tokens"]
    assert upstream.count("/v1/chat/completions") == 1


def test_streaming_miss_is_recorded_and_replayed(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    request = chat("tell me a short story about caches", stream_options={"include_usage": True})
    streamed = c.chat.completions.with_raw_response.create(**request, stream=True)
    assert streamed.headers["x-cachelm-cache"] == "miss"
    chunks = list(streamed.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    expected = chat_answer(request)["choices"][0]["message"]["content"]
    assert text == expected
    # A hit, both as JSON and as a stream, gives what the stream recorded (usage included).
    plain = c.chat.completions.with_raw_response.create(**request)
    assert plain.headers["x-cachelm-cache"] == "hit"
    assert plain.parse().choices[0].message.content == expected
    assert (
        plain.parse().usage is not None
        and plain.parse().usage.total_tokens == chat_answer(request)["usage"]["total_tokens"]
    )
    replayed = c.chat.completions.with_raw_response.create(**request, stream=True)
    assert replayed.headers["x-cachelm-cache"] == "hit"
    chunks = list(replayed.parse())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage is not None
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert upstream.count("/v1/chat/completions") == 1


def test_streamed_miss_records_usage_without_sending_it(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    request = chat("stream without asking for usage")
    chunks = list(c.chat.completions.create(**request, stream=True))
    assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)  # as the client asked
    assert upstream.calls[-1].body["stream_options"] == {"include_usage": True}  # but cachelm asked for it
    hit = c.chat.completions.create(**request)
    assert hit.usage is not None and hit.usage.total_tokens == chat_answer(request)["usage"]["total_tokens"]


def test_completions_and_models(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    request = {"model": "gpt-4o-mini", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 3}
    a = c.completions.with_raw_response.create(**request)
    b = c.completions.create(**request, stream=True)
    assert a.headers["x-cachelm-cache"] == "miss"
    expected = completion_answer(request)["choices"][0]
    assert a.parse().choices[0].text == expected["text"]
    assert "".join(ch.choices[0].text for ch in b) == expected["text"]
    assert upstream.count("/v1/completions") == 1
    assert [m.id for m in c.models.list().data] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]


def test_embeddings_through_the_embedding_cache(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    first = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["alpha", "beta"])
    second = c.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["beta", "gamma", "alpha"]
    )
    assert first.headers["x-cachelm-hits"] == "0/2"
    assert second.headers["x-cachelm-hits"] == "2/3"
    vectors = [d.embedding for d in second.parse().data]
    for text, vector in zip(["beta", "gamma", "alpha"], vectors, strict=True):
        assert vector == pytest.approx(embedding_vector(text), abs=1e-6)  # float32 storage
    calls = [call.body["input"] for call in upstream.calls if call.path == "/v1/embeddings"]
    assert calls == [["alpha", "beta"], ["gamma"]]  # only the missing input went upstream


def test_erasing_a_user_erases_the_embeddings_their_inputs_cached(proxy: ProxyThread) -> None:
    c = client(proxy)
    model = "text-embedding-3-small"

    def hits(texts: list[str], user: str, *, header: bool = False) -> str:
        who: dict[str, Any] = (
            {"extra_headers": {"x-cachelm-user": user}} if header else {"user": user}
        )  # the header names the user as the body's `user` does
        answer = c.embeddings.with_raw_response.create(model=model, input=texts, **who)
        return answer.headers["x-cachelm-hits"]

    assert hits(["warm-up"], "carol") == "0/1"  # the first request of a model learns its vector size
    assert hits(["alice's text", "shared text"], "alice") == "0/2"
    assert hits(["bob's text", "shared text"], "bob") == "1/2"  # bob reuses the vector alice's text cached
    admin = {"authorization": f"Bearer {ADMIN}"}
    erased = httpx.post(proxy.url + "/admin/erase", json={"tenant": "acme", "user": "alice"}, headers=admin)
    assert erased.json() == {"deleted": 2}  # the two vectors her inputs put in the cache
    assert hits(["alice's text", "shared text", "bob's text"], "dave") == "1/3"  # only bob's is left
    assert hits(["erin's text"], "erin", header=True) == "0/1"
    erased = httpx.post(proxy.url + "/admin/erase", json={"tenant": "acme", "user": "erin"}, headers=admin)
    assert erased.json() == {"deleted": 1}
    bad = c.embeddings.with_raw_response.create  # `user` is checked as on chat requests
    with pytest.raises(openai.BadRequestError, match="`user` must be a string"):
        bad(model=model, input=["x"], user="u" * 300)


def test_cache_control_headers_and_body(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    c = client(proxy)
    request = chat("control me")
    bypass = c.chat.completions.with_raw_response.create(**request, extra_headers={"x-cachelm-bypass": "on"})
    assert bypass.headers["x-cachelm-cache"] == "bypass"
    assert c.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "miss"
    refreshed = c.chat.completions.with_raw_response.create(
        **request, extra_body={"cache": {"refresh": True}}
    )
    assert refreshed.headers["x-cachelm-cache"] == "miss"
    assert c.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "hit"
    assert upstream.count("/v1/chat/completions") == 3
    assert "cache" not in upstream.calls[-1].body  # cachelm's own field never reaches the upstream
    # Sampled requests are not cached unless asked for.
    sampled = chat("sampled", temperature=0.7)
    for _ in range(2):
        assert c.chat.completions.with_raw_response.create(**sampled).headers["x-cachelm-cache"] == "bypass"
    allow = {"x-cachelm-sampled": "on"}
    assert (
        c.chat.completions.with_raw_response.create(**sampled, extra_headers=allow).headers["x-cachelm-cache"]
        == "miss"
    )
    assert (
        c.chat.completions.with_raw_response.create(**sampled, extra_headers=allow).headers["x-cachelm-cache"]
        == "hit"
    )


def test_ttl_expires_entries(proxy: ProxyThread) -> None:
    c = client(proxy)
    request = chat("short lived")
    c.chat.completions.create(**request, extra_headers={"x-cachelm-ttl": "0.3"})
    assert c.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "hit"
    time.sleep(0.4)
    assert c.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "miss"


def test_bad_cache_control_is_a_clear_400(proxy: ProxyThread) -> None:
    c = client(proxy)
    with pytest.raises(openai.BadRequestError, match="x-cachelm-ttl"):
        c.chat.completions.create(**chat("x"), extra_headers={"x-cachelm-ttl": "-5"})
    with pytest.raises(openai.BadRequestError, match=r"cache.*unknown fields"):
        c.chat.completions.create(**chat("x"), extra_body={"cache": {"nope": 1}})


def test_tenants_are_isolated_and_keys_required(proxy: ProxyThread, upstream: OpenAIUpstream) -> None:
    request = chat("shared question")
    a = client(proxy, "acme").chat.completions.with_raw_response.create(**request)
    b = client(proxy, "globex").chat.completions.with_raw_response.create(**request)
    assert (a.headers["x-cachelm-cache"], b.headers["x-cachelm-cache"]) == ("miss", "miss")
    assert upstream.count() == 2
    bad = openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong-key-000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**request)
    assert httpx.post(proxy.url + "/v1/chat/completions", json=request).status_code == 401


def test_admin_api(proxy: ProxyThread) -> None:
    acme, globex = client(proxy, "acme"), client(proxy, "globex")
    acme.chat.completions.create(**chat("one", user="alice"))
    acme.chat.completions.create(**chat("two", user="bob"))
    globex.chat.completions.create(**chat("one", user="alice"))
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(proxy.url + "/admin/stats").status_code == 403
    assert (
        httpx.get(proxy.url + "/admin/stats", headers={"authorization": f"Bearer {KEYS['acme']}"}).status_code
        == 403
    )
    stats = httpx.get(proxy.url + "/admin/stats", headers=admin).json()
    assert stats["requests"]["miss"] == 3 and stats["entries"] == 3
    listed = httpx.get(proxy.url + "/admin/entries?tenant=acme", headers=admin).json()["entries"]
    assert sorted(e["user"] for e in listed) == ["alice", "bob"] and {e["tenant"] for e in listed} == {"acme"}
    erased = httpx.post(proxy.url + "/admin/erase", json={"tenant": "acme", "user": "alice"}, headers=admin)
    assert erased.json() == {"deleted": 2}  # records: alice's answer and its logged request
    assert acme.chat.completions.with_raw_response.create(**chat("one")).headers["x-cachelm-cache"] == "miss"
    assert acme.chat.completions.with_raw_response.create(**chat("two")).headers["x-cachelm-cache"] == "hit"
    assert globex.chat.completions.with_raw_response.create(**chat("one")).headers["x-cachelm-cache"] == "hit"
    purged = httpx.post(proxy.url + "/admin/purge", json={"tenant": "globex"}, headers=admin)
    assert purged.json() == {"deleted": 2}  # records: the answer and its logged request
    bad = httpx.post(proxy.url + "/admin/purge", json={}, headers=admin)
    assert bad.status_code == 400 and "filter" in bad.json()["error"]["message"]


def test_hit_latency_floor(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/c.db", hit_floor_ms=80, access_log=False
    )
    with ProxyThread(config) as proxy:
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0)
        c.chat.completions.create(**chat("pad me"))
        start = time.perf_counter()
        raw = c.chat.completions.with_raw_response.create(**chat("pad me"))
        elapsed = time.perf_counter() - start
    assert raw.headers["x-cachelm-cache"] == "hit"
    assert elapsed >= 0.080  # a floor, not a performance target: a hit may never answer sooner


def test_metrics_healthz_openapi(proxy: ProxyThread) -> None:
    client(proxy).chat.completions.create(**chat("metrics"))
    client(proxy).chat.completions.create(**chat("metrics"))
    text = httpx.get(proxy.url + "/metrics").text
    assert 'cachelm_server_requests_total{cache="hit",endpoint="chat.completions",status="200"} 1.0' in text
    assert "cachelm_hits_total" in text
    health = httpx.get(proxy.url + "/healthz").json()
    assert health["status"] == "ok" and health["store"] == "ok"
    document = httpx.get(proxy.url + "/openapi.json").json()
    assert set(document["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


def test_structured_access_log_with_request_ids(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    config = ServerConfig(upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/c.db", access_log=True)
    with ProxyThread(config, registry()) as proxy:
        assert proxy.runtime.access_log is not None
        stream = proxy.runtime.access_log.stream = io.StringIO()
        c = client(proxy)
        c.chat.completions.create(**chat("logged"), extra_headers={"x-request-id": "req-123"})
        answer = c.chat.completions.with_raw_response.create(**chat("logged"))
        proxy.runtime.access_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["request_id"], x["tenant"], x["cache"], x["status"]) for x in lines] == [
        ("req-123", "acme", "miss", 200),
        (answer.headers["x-request-id"], "acme", "hit", 200),
    ]
    assert all(x["endpoint"] == "chat.completions" and x["ms"] >= 0 and x["ts"] > 0 for x in lines)
