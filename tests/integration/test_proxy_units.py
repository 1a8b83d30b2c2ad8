"""The proxy's small parts on their own: tenant registry, cache-control parsing, SSE record/replay."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson
import pytest

from cachelm.errors import ConfigError, TenantError
from cachelm.server.control import CacheControl, RequestError, parse_control
from cachelm.server.sse import DONE, StreamRecorder, replay
from cachelm.server.tenants import TenantRegistry, hash_key
from tests.upstream import _chat_chunks, _completion_chunks, chat_answer, completion_answer


def test_registry_keeps_only_digests_and_authenticates() -> None:
    registry = TenantRegistry.from_config(
        {"admin_keys": [hash_key("admin-key-1")], "tenants": {"acme": {"keys": [hash_key("acme-key-1")]}}}
    )
    registry.merge_env("globex:globex-key-1", None)
    assert registry.authenticate("acme-key-1").tenant_id == "acme"
    assert registry.authenticate("globex-key-1").tenant_id == "globex"
    assert registry.is_admin("admin-key-1") and not registry.is_admin("acme-key-1")
    for bad in (None, "", "acme-key-2"):
        with pytest.raises(TenantError):
            registry.authenticate(bad)
    held = repr(registry.tenants) + repr(registry.admin_digests)
    assert "acme-key-1" not in held and "globex-key-1" not in held  # no key in clear anywhere
    assert hashlib.sha256(b"acme-key-1").digest() in registry.tenants


def test_open_registry_and_config_errors() -> None:
    assert TenantRegistry().authenticate(None).tenant_id == "default"
    with pytest.raises(ConfigError, match="sha256"):
        TenantRegistry.from_config({"tenants": {"acme": {"keys": ["plain-text-key"]}}})
    with pytest.raises(ConfigError, match="tenant_id"):
        TenantRegistry.from_config({"tenants": {"bad tenant!": {"keys": [hash_key("k" * 10)]}}})
    with pytest.raises(ConfigError, match="two tenants"):
        TenantRegistry.from_config(
            {"tenants": {"a": {"keys": [hash_key("same-key-1")]}, "b": {"keys": [hash_key("same-key-1")]}}}
        )
    with pytest.raises(ConfigError, match="tenant:key"):
        TenantRegistry().merge_env("no-separator", None)


def test_parse_control_headers_win_over_body() -> None:
    assert parse_control({}, {}) == CacheControl()
    control = parse_control(
        {"x-cachelm-ttl": "60", "x-cachelm-semantic": "off", "x-cachelm-tags": "a, b"},
        {"cache": {"ttl": 5, "bypass": True, "delta": 0.05, "semantic": True}},
    )
    assert control == CacheControl(bypass=True, ttl=60.0, semantic=False, delta=0.05, tags=("a", "b"))


@pytest.mark.parametrize(
    ("headers", "body", "needle"),
    [
        ({"x-cachelm-ttl": "abc"}, {}, "x-cachelm-ttl"),
        ({"x-cachelm-delta": "1"}, {}, "delta"),
        ({"x-cachelm-bypass": "maybe"}, {}, "x-cachelm-bypass"),
        ({}, {"cache": {"ttl": -1}}, "cache.ttl"),
        ({}, {"cache": {"tags": "x" * 70}}, "cache.tags"),
        ({}, {"cache": []}, "`cache` must be an object"),
    ],
)
def test_parse_control_rejects_bad_values(headers: dict[str, str], body: dict[str, Any], needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        parse_control(headers, body)


def _record(endpoint: str, chunks: list[dict[str, Any]]) -> StreamRecorder:
    recorder = StreamRecorder(endpoint)
    for chunk in chunks:
        recorder.feed(json.dumps(chunk).encode())
    recorder.feed(DONE)
    return recorder


@pytest.mark.parametrize("n", [1, 3])
def test_recorded_stream_equals_the_non_streamed_answer(n: int) -> None:
    body = {"model": "m", "n": n, "messages": [{"role": "user", "content": "one two three"}],
            "stream_options": {"include_usage": True}}  # fmt: skip
    recorded = _record("chat.completions", list(_chat_chunks(body))).response()
    expected = chat_answer(body)
    assert [c["message"]["content"] for c in recorded["choices"]] == [
        c["message"]["content"] for c in expected["choices"]
    ]
    assert recorded["usage"] == expected["usage"] and recorded["id"] == expected["id"]
    prompt = {"model": "m", "prompt": "four five", "max_tokens": 2}
    completion = _record("completions", list(_completion_chunks(prompt))).response()
    assert [c["text"] for c in completion["choices"]] == [
        c["text"] for c in completion_answer(prompt)["choices"]
    ]
    assert completion["choices"][0]["finish_reason"] == "length"


def test_incomplete_or_failed_streams_are_not_complete() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c"}]}
    chunks = list(_chat_chunks(body))
    truncated = StreamRecorder("chat.completions")
    for chunk in chunks[:-1]:  # no finish chunk
        truncated.feed(json.dumps(chunk).encode())
    truncated.feed(DONE)
    assert not truncated.complete
    no_done = StreamRecorder("chat.completions")
    for chunk in chunks:
        no_done.feed(json.dumps(chunk).encode())
    assert not no_done.complete
    errored = _record("chat.completions", [*chunks, {"error": {"message": "boom"}}])
    assert not errored.complete
    garbage = _record("chat.completions", chunks)
    garbage.feed(b"{not json")
    assert not garbage.complete
    assert _record("chat.completions", chunks).complete


def test_replay_then_record_round_trips() -> None:
    answer = chat_answer({"model": "m", "messages": [{"role": "user", "content": "x " * 60}]})
    answer["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    frames = list(replay("chat.completions", answer, include_usage=True))
    assert frames[-1] == b"data: [DONE]\n\n" and len(frames) > 4  # streamed in several pieces
    recorder = StreamRecorder("chat.completions")
    for frame in frames:
        recorder.feed(frame[len(b"data: ") :].strip())
    assert recorder.complete
    again = recorder.response()
    assert again["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
    assert again["choices"][0]["message"]["tool_calls"] == answer["choices"][0]["message"]["tool_calls"]
    assert again["usage"] == answer["usage"]
    assert orjson.loads(frames[0][6:])["object"] == "chat.completion.chunk"
