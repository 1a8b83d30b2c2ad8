"""Streamed answers: assemble OpenAI stream chunks into one response, and replay a response as chunks.

Plain dicts in, plain dicts out (the OpenAI wire format), so the SDK wrapper and the proxy share them.

`assemble_chat` / `assemble_completion` return None unless the stream *completed*: every expected
choice (``n`` of them) reached a ``finish_reason``. A stream cut by the network or by the caller never
yields an answer, so it is never cached.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Chunk = dict[str, Any]

_TOP_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def _top(chunks: list[Mapping[str, Any]], obj: str) -> dict[str, Any]:
    out: dict[str, Any] = {"object": obj}
    for chunk in chunks:
        for name in _TOP_FIELDS:
            if chunk.get(name) is not None and name not in out:
                out[name] = chunk[name]
        if chunk.get("usage") is not None:
            out["usage"] = chunk["usage"]
    return out


def _complete(choices: dict[int, dict[str, Any]], expected: int) -> bool:
    return sorted(choices) == list(range(expected)) and all(c.get("finish_reason") for c in choices.values())


def assemble_chat(chunks: Iterable[Mapping[str, Any]], *, expected_choices: int = 1) -> dict[str, Any] | None:
    """The ``chat.completion`` that `chunks` (``chat.completion.chunk`` dicts) add up to, or None if cut."""
    chunks = list(chunks)
    state: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            s = state.setdefault(choice["index"], {"content": [], "refusal": [], "tools": {}, "logprobs": []})
            delta = choice.get("delta") or {}
            if delta.get("role"):
                s["role"] = delta["role"]
            if delta.get("content"):
                s["content"].append(delta["content"])
            if delta.get("refusal"):
                s["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or []:
                t = s["tools"].setdefault(
                    call.get("index", 0), {"type": "function", "name": [], "arguments": []}
                )
                if call.get("id"):
                    t["id"] = call["id"]
                if call.get("type"):
                    t["type"] = call["type"]
                function = call.get("function") or {}
                if function.get("name"):
                    t["name"].append(function["name"])
                if function.get("arguments"):
                    t["arguments"].append(function["arguments"])
            logprobs = choice.get("logprobs") or {}
            s["logprobs"].extend(logprobs.get("content") or [])
            if choice.get("finish_reason"):
                s["finish_reason"] = choice["finish_reason"]
    if not _complete(state, expected_choices):
        return None
    response = _top(chunks, "chat.completion")
    response["choices"] = [_chat_choice(i, state[i]) for i in sorted(state)]
    return response


def _chat_choice(index: int, s: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": s.get("role", "assistant"),
        "content": "".join(s["content"]) if s["content"] or not s["tools"] else None,
    }
    if s["refusal"]:
        message["refusal"] = "".join(s["refusal"])
    if s["tools"]:
        message["tool_calls"] = [
            {
                "id": t.get("id", ""),
                "type": t["type"],
                "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])},
            }
            for _, t in sorted(s["tools"].items())
        ]
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": s["logprobs"]} if s["logprobs"] else None,
        "finish_reason": s["finish_reason"],
    }


def assemble_completion(
    chunks: Iterable[Mapping[str, Any]], *, expected_choices: int = 1
) -> dict[str, Any] | None:
    """The ``text_completion`` that legacy completion stream `chunks` add up to, or None if cut."""
    chunks = list(chunks)
    state: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            s = state.setdefault(choice["index"], {"text": []})
            s["text"].append(choice.get("text") or "")
            if choice.get("logprobs"):
                s["has_logprobs"] = True  # legacy logprobs arrays are not merged: such streams are not kept
            if choice.get("finish_reason"):
                s["finish_reason"] = choice["finish_reason"]
    if not _complete(state, expected_choices) or any(s.get("has_logprobs") for s in state.values()):
        return None
    response = _top(chunks, "text_completion")
    response["choices"] = [
        {
            "index": i,
            "text": "".join(state[i]["text"]),
            "logprobs": None,
            "finish_reason": state[i]["finish_reason"],
        }
        for i in sorted(state)
    ]
    return response


def chat_chunks(response: Mapping[str, Any], *, include_usage: bool = False) -> Iterator[Chunk]:
    """Replay a ``chat.completion`` dict as the ``chat.completion.chunk`` dicts a live stream would send."""
    base = {name: response[name] for name in _TOP_FIELDS if response.get(name) is not None}
    base["object"] = "chat.completion.chunk"
    for choice in response.get("choices") or []:
        index, message = choice.get("index", 0), choice.get("message") or {}
        yield _chat_chunk(base, index, {"role": message.get("role", "assistant"), "content": ""})
        if message.get("content"):
            yield _chat_chunk(base, index, {"content": message["content"]}, logprobs=choice.get("logprobs"))
        if message.get("refusal"):
            yield _chat_chunk(base, index, {"refusal": message["refusal"]})
        for j, call in enumerate(message.get("tool_calls") or []):
            yield _chat_chunk(base, index, {"tool_calls": [{"index": j, **call}]})
        yield _chat_chunk(base, index, {}, finish=choice.get("finish_reason"))
    if include_usage and response.get("usage") is not None:
        yield {**base, "choices": [], "usage": response["usage"]}


def _chat_chunk(
    base: Mapping[str, Any],
    index: int,
    delta: dict[str, Any],
    *,
    finish: str | None = None,
    logprobs: Any = None,
) -> Chunk:
    return {
        **base,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def completion_chunks(response: Mapping[str, Any], *, include_usage: bool = False) -> Iterator[Chunk]:
    """Replay a ``text_completion`` dict as the chunks a live legacy completion stream would send."""
    base = {name: response[name] for name in _TOP_FIELDS if response.get(name) is not None}
    base["object"] = "text_completion"
    for choice in response.get("choices") or []:
        index = choice.get("index", 0)
        if choice.get("text"):
            yield {
                **base,
                "choices": [
                    {"index": index, "text": choice["text"], "logprobs": None, "finish_reason": None}
                ],
            }
        yield {
            **base,
            "choices": [
                {"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}
            ],
        }
    if include_usage and response.get("usage") is not None:
        yield {**base, "choices": [], "usage": response["usage"]}
