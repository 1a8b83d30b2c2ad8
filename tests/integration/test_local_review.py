"""Local upstream review: the OpenAI protocol as a client sees it through a real proxy and the openai SDK —
bad prompts and parameters are 400s naming the parameter (streaming or not), fields the engine cannot
honour are refused rather than ignored, content parts are read as their text, a failing forward pass is a
clear 500 that leaves the engine serving, and usage and finish reasons follow the protocol."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cachelm.server.config import ServerConfig
from cachelm.server.local import LocalEngineUpstream
from cachelm.server.testing import ProxyThread

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "tiny-llama"
CONTEXT = 64  # the tiny model's max_position_embeddings
BYPASS = {"x-cachelm-bypass": "on"}  # straight to the engine every time


class Faults:
    """Makes the model's forward pass raise while `on` (an out-of-memory stands in for any failure)."""

    on = False


@pytest.fixture(scope="module")
def engine() -> Any:
    from cachelm.engine.engine import Engine, build_prefix_cache
    from cachelm.engine.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama(max_position_embeddings=CONTEXT)
    forward = model.forward

    def failing_forward(*args: Any, **kwargs: Any) -> Any:
        if Faults.on:
            raise RuntimeError("CUDA out of memory")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    return Engine(
        model, tiny_tokenizer(), prefix_cache=build_prefix_cache(model, model_id=MODEL, block_size=4)
    )


@pytest.fixture
def client(engine: Any, tmp_path: Path) -> Iterator[openai.OpenAI]:
    config = ServerConfig(store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False)
    with ProxyThread(config, upstream=LocalEngineUpstream(engine, model_id=MODEL)) as proxy:
        yield openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=60)


def chat(text: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {"model": MODEL, "temperature": 0, "max_tokens": 6, "messages": messages, **extra}


def completion(prompt: str = "The quick brown fox", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "max_tokens": 6, "prompt": prompt, **extra}


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_is_a_400_streaming_or_not(client: openai.OpenAI, stream: bool) -> None:
    # Before: an empty prompt was a 500 when streamed (the engine checked it at the first token, after the
    # upstream had set the stream up), and a prompt past the model's context was answered with noise.
    with pytest.raises(openai.BadRequestError, match="`prompt`") as empty:
        client.completions.create(**completion(""), stream=stream)
    assert empty.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match=f"context of {CONTEXT}") as long:
        client.chat.completions.create(**chat("Hello " * CONTEXT), stream=stream)
    assert long.value.body["param"] == "messages"  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),  # before: the default of 256 tokens
        ({"max_tokens": -1}, "max_tokens"),  # before: named `max_new_tokens`, with no param
        ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),  # OpenAI's range is [0, 2]; before: sampled at 2.5
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -(1 << 63) - 1}, "seed"),
    ],
)
def test_sampling_parameters_are_checked_under_their_openai_names(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    assert_refused(client, chat(**extra), param)


def assert_refused(client: openai.OpenAI, request: dict[str, Any], param: str) -> None:
    """`request` is a 400 whose message and `param` name `param`."""
    with pytest.raises(openai.BadRequestError, match=f"`{param}`") as refused:
        client.chat.completions.create(**request, extra_headers=BYPASS)
    assert refused.value.body["param"] == param  # type: ignore[index]


def test_top_p_zero_keeps_only_the_most_likely_token(client: openai.OpenAI) -> None:
    # OpenAI takes top_p = 0; before, `or 1.0` read it as 1: full sampling at the given temperature.
    greedy = client.chat.completions.create(**chat(max_tokens=12), extra_headers=BYPASS)
    for seed in range(3):
        nucleus = client.chat.completions.create(
            **chat(max_tokens=12, temperature=1.5, top_p=0, seed=seed), extra_headers=BYPASS
        )
        assert nucleus.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"logit_bias": {"5": 100}}, "logit_bias"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"frequency_penalty": -0.5}, "frequency_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_not_ignored(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    # Before, each was dropped silently: a 200 without the logprobs, bias, penalties, tools or JSON mode
    # the client asked for.
    assert_refused(client, chat(**extra), param)


@pytest.mark.parametrize(
    ("extra", "param"), [({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"logprobs": 0}, "logprobs")]
)
def test_completion_fields_that_would_change_the_answer_are_refused(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=f"`{param}`"):
        client.completions.create(**completion(**extra), extra_headers=BYPASS)


def test_fields_at_their_defaults_are_served(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(**chat(), extra_headers=BYPASS).choices[0].message.content
    defaults = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    same = client.chat.completions.create(
        **chat(**defaults, response_format={"type": "text"}), extra_headers=BYPASS
    )
    assert same.choices[0].message.content == plain


def test_content_parts_are_read_as_their_text(client: openai.OpenAI) -> None:
    # Before, the chat template rendered the list itself: "[{'type': 'text', 'text': ...}]".
    text = client.chat.completions.create(**chat("Hello, how are you today?"), extra_headers=BYPASS)
    parts = [{"type": "text", "text": "Hello, how are you today?"}]
    from_parts = client.chat.completions.create(**chat(parts), extra_headers=BYPASS)  # type: ignore[arg-type]
    assert from_parts.choices[0].message.content == text.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="text parts") as refused:
        client.chat.completions.create(**chat(image), extra_headers=BYPASS)  # type: ignore[arg-type]
    assert refused.value.body["param"] == "messages[0].content"  # type: ignore[index]


@pytest.mark.parametrize("headers", [{}, BYPASS], ids=["miss", "bypass"])
def test_a_failing_forward_pass_is_a_clear_500_and_leaves_the_engine_serving(
    client: openai.OpenAI, headers: dict[str, str]
) -> None:
    # Before, a non-streaming request said only "internal error: RuntimeError" (the streamed one named
    # the engine and its error).
    body = chat(f"{len(headers)}: keys and values of every attention layer are stored in blocks of tokens.")
    Faults.on = True
    try:
        with pytest.raises(
            openai.InternalServerError, match="local engine failed: RuntimeError: CUDA out of"
        ):
            client.chat.completions.create(**body, extra_headers=headers)
    finally:
        Faults.on = False
    first = client.chat.completions.create(**body, extra_headers=BYPASS)
    again = client.chat.completions.create(**body, extra_headers=BYPASS)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage is not None and again.usage is not None
    assert again.usage.prompt_tokens_details is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # the failed request stored nothing
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_streamed_chunks_usage_and_finish_reasons_follow_the_protocol(client: openai.OpenAI) -> None:
    body = chat("A cache keeps the results of earlier work.", max_tokens=8)
    whole = client.chat.completions.create(**body, extra_headers=BYPASS)
    chunks = list(
        client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}, extra_headers=BYPASS
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.prompt_tokens_details is not None
    assert (last.usage.prompt_tokens_details.cached_tokens or 0) > 0  # the non-streamed call stored it
    # An answer cut by the model's context ends with "length" and fills the context exactly.
    full = chat("Hello " * 13, max_tokens=200)  # about 48 prompt tokens of 64
    cut = client.chat.completions.create(**full, extra_headers=BYPASS)
    assert cut.usage is not None
    if cut.choices[0].finish_reason == "length":
        assert cut.usage.total_tokens == CONTEXT
