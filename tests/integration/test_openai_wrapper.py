"""The `openai` SDK wrapper, over real HTTP against a local OpenAI-protocol server (tests/upstream.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cachelm.errors import ConfigError
from cachelm.response.exact import ExactCache
from cachelm.response.openai_client import cached, request_of
from cachelm.response.streaming import assemble_chat, assemble_completion, chat_chunks, completion_chunks
from cachelm.store.sqlite import SQLiteStore
from tests.upstream import OpenAIUpstream, chat_answer

CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def upstream() -> Iterator[OpenAIUpstream]:
    server = OpenAIUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path: Path, upstream: OpenAIUpstream) -> Iterator[ExactCache]:
    upstream.reset()
    with SQLiteStore(tmp_path / "cache.db") as store:
        yield ExactCache(store)


@pytest.fixture
def raw(upstream: OpenAIUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=upstream.base_url, api_key="test", max_retries=0)


@pytest.fixture
def araw(upstream: OpenAIUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=upstream.base_url, api_key="test", max_retries=0)


def ask(text: str, **params: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        **params,
    }


def _content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_second_call_is_served_from_the_cache(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    first = client.chat.completions.create(**ask("what is a cache?"))
    second = client.chat.completions.create(**ask("what is a cache?"))
    assert upstream.count(CHAT_PATH) == 1
    assert isinstance(first, ChatCompletion) and isinstance(second, ChatCompletion)
    assert second.to_dict() == first.to_dict()
    # The reused answer is the one a fresh upstream call gives.
    fresh = raw.chat.completions.create(**ask("what is a cache?"))
    assert second.choices[0].message.content == fresh.choices[0].message.content
    assert second.choices[0].message.content == "Echo from gpt-4o-mini: what is a cache?"
    assert cache.metrics.count("hits", layer="exact") == 1


def test_a_cached_answer_is_replayed_as_a_stream(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    full = client.chat.completions.create(**ask("stream me"))
    stream = client.chat.completions.create(
        **ask("stream me"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert upstream.count(CHAT_PATH) == 1
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert _content(chunks) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens  # type: ignore[union-attr]
    # The replayed chunks add up to the cached answer, as a live stream would.
    assert assemble_chat([c.to_dict() for c in chunks]) == {
        **full.to_dict(),
        "choices": [
            {
                **full.to_dict()["choices"][0],
                "message": {"role": "assistant", "content": full.choices[0].message.content},
            }
        ],
    }


def test_a_streamed_miss_is_passed_through_recorded_and_stored(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    with client.chat.completions.create(**ask("tell me more"), stream=True) as stream:
        live = list(stream)
    assert len(live) > 3  # one chunk per word: really streamed
    assert _content(live) == chat_answer(ask("tell me more"))["choices"][0]["message"]["content"]
    again = client.chat.completions.create(**ask("tell me more"))
    assert upstream.count(CHAT_PATH) == 1
    assert again.choices[0].message.content == _content(live)
    replayed = client.chat.completions.create(**ask("tell me more"), stream=True)
    assert replayed.response.status_code == 200  # as on the SDK's own streams (AttributeError before)
    assert replayed.response.headers["x-cachelm-cache"] == "hit"
    replay = list(replayed)
    assert _content(replay) == _content(live) and upstream.count(CHAT_PATH) == 1


@pytest.mark.parametrize("stream_usage", [True, False])
def test_a_streamed_miss_stores_its_usage_without_showing_the_caller_an_unasked_chunk(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream, stream_usage: bool
) -> None:
    # Before, a stream whose caller did not ask for usage was stored without it: later hits had
    # usage=None and credited no saved tokens.
    client = cached(raw, cache, stream_usage=stream_usage)
    request = ask(f"count my words please {stream_usage}")
    live = list(client.chat.completions.create(**request, stream=True))
    assert all(chunk.choices for chunk in live)  # no usage-only chunk for a caller that did not ask
    sent = upstream.calls[-1].body.get("stream_options")
    assert sent == ({"include_usage": True} if stream_usage else None)
    hit = client.chat.completions.create(**request)
    expected = chat_answer(request)["usage"]
    assert (hit.usage.model_dump(exclude_none=True) if hit.usage else None) == (
        expected if stream_usage else None
    )
    asked = list(
        client.chat.completions.create(**ask("and mine"), stream=True, stream_options={"include_usage": True})
    )
    assert asked[-1].usage is not None and not asked[-1].choices  # a caller that asked still gets it


@pytest.mark.parametrize("fault", ["cut=3", "truncate=3"])
def test_a_cut_stream_is_never_cached(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream, fault: str
) -> None:
    client = cached(raw, cache)
    received: list[ChatCompletionChunk] = []
    stream = client.chat.completions.create(
        **ask("a long answer please"), stream=True, extra_headers={"X-Upstream-Fault": fault}
    )
    if fault.startswith("cut"):
        with pytest.raises(openai.APIConnectionError):
            for chunk in stream:
                received.append(chunk)
    else:
        received.extend(stream)  # ends "normally", but no choice finished
    assert len(received) == 3
    assert len(cache.backend) == 0
    answer = client.chat.completions.create(**ask("a long answer please"))
    assert upstream.count(CHAT_PATH) == 2
    assert answer.choices[0].finish_reason == "stop"


def test_a_stream_abandoned_by_the_caller_is_not_cached(raw: openai.OpenAI, cache: ExactCache) -> None:
    client = cached(raw, cache)
    with client.chat.completions.create(**ask("one two three four"), stream=True) as stream:
        next(stream)
        next(stream)
    assert len(cache.backend) == 0


def test_upstream_errors_propagate_and_are_not_cached(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    upstream.inject("status=503")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**ask("flaky"))
    assert len(cache.backend) == 0
    assert (
        client.chat.completions.create(**ask("flaky")).choices[0].message.content
        == "Echo from gpt-4o-mini: flaky"
    )
    assert upstream.count(CHAT_PATH) == 2


def test_sampled_requests_go_upstream_unless_allowed(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    sampled = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a poem"}]}
    client = cached(raw, cache)
    client.chat.completions.create(**sampled)
    client.chat.completions.create(**sampled, temperature=0.8)
    client.chat.completions.create(**sampled, temperature=0.8)
    assert upstream.count(CHAT_PATH) == 3 and len(cache.backend) == 0
    permissive = cached(raw, cache, allow_sampled=True)
    permissive.chat.completions.create(**sampled, temperature=0.8)
    permissive.chat.completions.create(**sampled, temperature=0.8)
    assert upstream.count(CHAT_PATH) == 4


def test_extra_body_is_part_of_the_key_and_transport_options_are_not(
    raw: openai.OpenAI, cache: ExactCache
) -> None:
    base = ask("q")
    assert request_of({**base, "extra_body": {"top_k": 5}, "timeout": 3.0}) == {**base, "top_k": 5}
    client = cached(raw, cache)
    client.chat.completions.create(**base, extra_body={"top_k": 5})
    client.chat.completions.create(
        **base, extra_body={"top_k": 5}, timeout=30, extra_headers={"X-Trace": "1"}
    )
    client.chat.completions.create(**base, extra_body={"top_k": 6})
    assert cache.metrics.count("hits", layer="exact") == 1
    assert cache.metrics.count("misses", layer="exact") == 2


def test_messages_may_be_any_iterable_and_pydantic_objects(raw: openai.OpenAI, cache: ExactCache) -> None:
    client = cached(raw, cache)
    first = client.chat.completions.create(**ask("gen"))
    as_generator = {**ask("gen"), "messages": (m for m in ask("gen")["messages"])}
    again = client.chat.completions.create(**as_generator)
    assert again.to_dict() == first.to_dict()  # same key, and the SDK was not handed an exhausted generator
    follow_up = ask("and then?")
    follow_up["messages"] = [*ask("gen")["messages"], first.choices[0].message, *follow_up["messages"]]
    answer = client.chat.completions.create(**follow_up)
    assert answer.choices[0].message.content == "Echo from gpt-4o-mini: and then?"
    assert client.chat.completions.create(**follow_up).to_dict() == answer.to_dict()
    assert cache.metrics.count("hits", layer="exact") == 2
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        client.chat.completions.create(**ask("x"), extra_body={"thing": object()})


def test_tenants_do_not_share_answers(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    cached(raw, cache, tenant="acme").chat.completions.create(**ask("shared?"))
    cached(raw, cache, tenant="globex").chat.completions.create(**ask("shared?"))
    assert upstream.count(CHAT_PATH) == 2


def test_n_choices_stream_is_assembled_per_choice(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    list(client.chat.completions.create(**ask("pick", n=2), stream=True))
    hit = client.chat.completions.create(**ask("pick", n=2))
    assert upstream.count(CHAT_PATH) == 1
    assert [c.message.content for c in hit.choices] == [
        c["message"]["content"] for c in chat_answer(ask("pick", n=2))["choices"]
    ]


def test_legacy_completions_cached_and_replayed(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    params = {"model": "gpt-4o-mini", "prompt": "once upon", "temperature": 0, "max_tokens": 3}
    first = client.completions.create(**params)
    second = client.completions.create(**params)
    chunks = list(client.completions.create(**params, stream=True))
    assert upstream.count("/v1/completions") == 1
    assert isinstance(second, Completion) and second.to_dict() == first.to_dict()
    assert first.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text


def test_embeddings_are_cached_and_equal_a_recompute(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)  # embeddings never sample: cached without allow_sampled
    first = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    second = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    assert upstream.count("/v1/embeddings") == 1
    fresh = raw.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    assert [d.embedding for d in second.data] == [d.embedding for d in fresh.data]
    assert [d.embedding for d in second.data] == [d.embedding for d in first.data]
    assert len(second.data[0].embedding) == 8 and second.usage.prompt_tokens == 2
    client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"], dimensions=16)
    assert upstream.count("/v1/embeddings") == 3  # 2 direct + 1 for the new dimensions


async def test_async_embeddings_are_cached(
    araw: openai.AsyncOpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(araw, cache)
    vectors = [
        (await client.embeddings.create(model="text-embedding-3-small", input="hi")).data[0].embedding
        for _ in range(2)
    ]
    assert vectors[0] == vectors[1] and upstream.count("/v1/embeddings") == 1


def test_other_endpoints_pass_through_uncached(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(raw, cache)
    for _ in range(2):
        assert client.models.list().data[0].id == "gpt-4o-mini"
    assert upstream.count("/v1/models") == 2
    assert len(cache.backend) == 0


async def test_async_client_hits_streams_and_coalesces(
    araw: openai.AsyncOpenAI, cache: ExactCache, upstream: OpenAIUpstream
) -> None:
    client = cached(araw, cache)
    upstream.inject("delay=0.2")  # the first call is slow, so the other four arrive while it runs
    answers = await asyncio.gather(*(client.chat.completions.create(**ask("async q")) for _ in range(5)))
    assert upstream.count(CHAT_PATH) == 1
    assert {a.choices[0].message.content for a in answers} == {"Echo from gpt-4o-mini: async q"}
    assert all(isinstance(a, ChatCompletion) for a in answers)
    async with await client.chat.completions.create(**ask("async q"), stream=True) as stream:
        replay = [c async for c in stream]
    assert _content(replay) == "Echo from gpt-4o-mini: async q"
    assert all(isinstance(c, ChatCompletionChunk) for c in replay)
    live = [c async for c in await client.chat.completions.create(**ask("async stream"), stream=True)]
    hit = await client.chat.completions.create(**ask("async stream"))
    assert hit.choices[0].message.content == _content(live)
    assert upstream.count(CHAT_PATH) == 2
    assert all(chunk.choices for chunk in live)  # the usage chunk asked for the record is not shown...
    assert (
        hit.usage is not None
        and hit.usage.total_tokens == chat_answer(ask("async stream"))["usage"]["total_tokens"]
    )  # ...and the stored answer has its token counts


async def test_async_cut_stream_is_not_cached(araw: openai.AsyncOpenAI, cache: ExactCache) -> None:
    client = cached(araw, cache)
    stream = await client.chat.completions.create(
        **ask("async cut please"), stream=True, extra_headers={"X-Upstream-Fault": "cut=2"}
    )
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass
    assert len(cache.backend) == 0


def test_bad_arguments(raw: openai.OpenAI, cache: ExactCache) -> None:
    with pytest.raises(ConfigError, match="`client`"):
        cached(object(), cache)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`cache`"):
        cached(raw, object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`tenant`"):
        cached(raw, cache, tenant="")
    for ttl in (0, -1, float("inf"), float("nan"), True):  # inf: an expiry no store can hold
        with pytest.raises(ConfigError, match="`ttl` must be a finite number"):
            cached(raw, cache, ttl=ttl)


# -- stream assembly and replay (pure functions shared with the proxy) ------------------------------------

TOOL_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-t",
    "object": "chat.completion",
    "created": 5,
    "model": "gpt-4o",
    "system_fingerprint": "fp",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get", "arguments": '{"a": 1}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "put", "arguments": "{}"}},
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "I can't.", "refusal": "policy"},
            "logprobs": {"content": [{"token": "I", "logprob": -0.1, "bytes": [73], "top_logprobs": []}]},
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def test_replayed_chunks_assemble_back_to_the_answer() -> None:
    chunks = list(chat_chunks(TOOL_ANSWER, include_usage=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert assemble_chat(chunks, expected_choices=2) == TOOL_ANSWER
    assert [ChatCompletionChunk.model_validate(c).id for c in chunks[:1]] == ["chatcmpl-t"]


def test_assembly_needs_every_choice_finished() -> None:
    chunks = list(chat_chunks(TOOL_ANSWER))
    assert assemble_chat(chunks, expected_choices=3) is None  # a choice never arrived
    assert assemble_chat(chunks[:-1], expected_choices=2) is None  # the last finish chunk was cut
    assert assemble_chat([], expected_choices=1) is None


def test_tool_call_arguments_streamed_in_pieces_are_joined() -> None:
    def piece(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "c",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    call = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}
    chunks = [
        piece({"role": "assistant", "content": None, "tool_calls": [call]}),
        piece({"tool_calls": [{"index": 0, "function": {"arguments": ": 2}"}}]}),
        piece({}, "tool_calls"),
    ]
    message = assemble_chat(chunks)["choices"][0]["message"]  # type: ignore[index]
    assert message["tool_calls"] == [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}
    ]
    assert message["content"] is None


def test_completion_replay_and_assembly() -> None:
    answer = {
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "hello world", "logprobs": None, "finish_reason": "length"}],
    }  # fmt: skip
    assert assemble_completion(list(completion_chunks(answer))) == answer


# -- entry options are checked before any upstream call (review) ------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"user": None}, "`user`"),
        ({"tags": [1]}, "`tags`"),
        ({"tags": [""]}, "`tags`"),
        ({"allow_sampled": "no"}, "`allow_sampled`"),
    ],
)
def test_cached_checks_its_entry_options_up_front(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream, options: dict[str, Any], name: str
) -> None:
    """`user`, `tags` and `allow_sampled` were taken unchecked. A bad `user` or tag surfaced as a
    ConfigError from ExactCache.store *after* the upstream call had been made and paid for, so its answer
    was lost (and a streamed miss was silently never cached); ``allow_sampled="no"`` was truthy and cached
    sampled answers."""
    with pytest.raises(ConfigError, match=name):
        cached(raw, cache, **options)
    assert upstream.count(CHAT_PATH) == 0


def test_valid_entry_options_store_the_answer_they_paid_for(raw: openai.OpenAI, cache: ExactCache) -> None:
    """The good path beside the refusals above (passed before too)."""
    client = cached(raw, cache, user="alice", tags=("faq",))
    first = client.chat.completions.create(**ask("kept?"))
    assert client.chat.completions.create(**ask("kept?")).to_dict() == first.to_dict()
    assert cache.erase_user("default", "alice") == 1
