"""Server-sent events: record a streamed answer into one response object, and replay one as a stream.

A miss that streams is forwarded chunk by chunk while `StreamRecorder` collects the chunks. The recorded
answer is stored only when the stream was *whole*: the upstream sent ``[DONE]``, each of the ``n``
choices asked for has a ``finish_reason``, and no chunk carried an ``error`` or a malformed field. A hit
is stored as the ordinary (non-streaming) response object, so either kind of request can be answered from
it; `replay` turns it back into chunks. Both keep everything of a choice that a client may have asked for:
content, refusal, tool calls, the legacy ``function_call``, logprobs, and a provider's own string fields
(``reasoning_content``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

DONE = b"[DONE]"
_PIECE_CHARS = 48  # replayed content is cut into pieces of about this size, on spaces where possible


def frame(payload: bytes) -> bytes:
    """One SSE event carrying `payload`."""
    return b"data: " + payload + b"\n\n"


def ends_stream(event: bytes) -> tuple[bool, bool]:
    """``(is [DONE], is an error event)`` for one frame made by `frame`."""
    return event.startswith(b"data: " + DONE), event.startswith(b'data: {"error"')


class StreamRecorder:
    """Collects the chunks of one streamed completion (``chat.completions`` or ``completions``) that asked
    for `expected_choices` choices (``n``; times the prompts of a batched legacy completion)."""

    def __init__(self, endpoint: str, *, expected_choices: int = 1) -> None:
        self.endpoint = endpoint
        self.expected_choices = expected_choices
        self.done = False
        self.error = False
        self._head: dict[str, Any] | None = None
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None

    def feed(self, payload: bytes) -> None:
        """Record one ``data:`` payload. Malformed chunks mark the stream as failed (never cached)."""
        if payload == DONE:
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = True
            return
        if not isinstance(chunk, dict) or "error" in chunk or not isinstance(chunk.get("choices"), list):
            self.error = True
            return
        if self._head is None:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk["choices"]:
            # Checked before merging: a chunk of the wrong shape must fail the stream (reported to the
            # client, never cached), not raise out of the flight after the client saw a clean end.
            if not _well_formed(choice, chat=self.endpoint != "completions"):
                self.error = True
                return
            self._merge(choice)

    def _merge(self, choice: dict[str, Any]) -> None:
        slot = self._choices.setdefault(
            choice.get("index", 0),
            {
                "text": [],
                "role": None,
                "refusal": [],
                "tools": {},
                "function": None,
                "logprobs": {},
                "extra": {},
                "finish": None,
            },
        )
        if choice.get("finish_reason") is not None:
            slot["finish"] = choice["finish_reason"]
        for name, items in (choice.get("logprobs") or {}).items():
            if isinstance(items, list):  # chat: content/refusal; legacy: tokens, token_logprobs, …
                slot["logprobs"].setdefault(name, []).extend(items)
        if self.endpoint == "completions":
            slot["text"].append(choice.get("text") or "")
            return
        delta = choice.get("delta") or {}
        slot["role"] = delta.get("role") or slot["role"]
        if delta.get("content"):
            slot["text"].append(delta["content"])
        if delta.get("refusal"):
            slot["refusal"].append(delta["refusal"])
        if delta.get("function_call"):
            function = slot["function"] = slot["function"] or {"name": "", "args": []}
            function["name"] += delta["function_call"].get("name") or ""
            function["args"].append(delta["function_call"].get("arguments") or "")
        for name, value in delta.items():  # e.g. `reasoning_content` (DeepSeek, vLLM): kept, not dropped
            if name not in _DELTA_FIELDS and isinstance(value, str) and value:
                slot["extra"].setdefault(name, []).append(value)
        for call in delta.get("tool_calls") or []:
            tool = slot["tools"].setdefault(
                call.get("index", 0), {"id": None, "type": "function", "name": "", "args": []}
            )
            tool["id"] = call.get("id") or tool["id"]
            function = call.get("function") or {}
            tool["name"] += function.get("name") or ""
            tool["args"].append(function.get("arguments") or "")

    @property
    def complete(self) -> bool:
        """True when the stream ended with ``[DONE]``, without errors, every choice it sent finished: the
        client has the whole answer the upstream gave."""
        return (
            self.done
            and not self.error
            and bool(self._choices)
            and all(slot["finish"] is not None for slot in self._choices.values())
        )

    @property
    def whole(self) -> bool:
        """`complete`, with each of the choices asked for (indices ``0..expected_choices-1``): only then is it
        stored. A complete stream with fewer choices is passed on as it came but not cached: an upstream
        that ignores ``n`` and one that dropped a choice look alike here."""
        return self.complete and set(self._choices) == set(range(self.expected_choices))

    def response(self) -> dict[str, Any]:
        """The recorded answer as a non-streaming response object. Only meaningful when `complete`."""
        head = self._head or {}
        chat = self.endpoint != "completions"
        choices = []
        for index in sorted(self._choices):
            slot = self._choices[index]
            text = "".join(slot["text"])
            logprobs = slot["logprobs"] or None
            if chat:
                message: dict[str, Any] = {"role": slot["role"] or "assistant", "content": text or None}
                for name, parts in slot["extra"].items():
                    message[name] = "".join(parts)
                if slot["refusal"]:
                    message["refusal"] = "".join(slot["refusal"])
                if slot["function"] is not None:
                    function = slot["function"]
                    message["function_call"] = {
                        "name": function["name"],
                        "arguments": "".join(function["args"]),
                    }
                if slot["tools"]:
                    message["tool_calls"] = [
                        {
                            "id": tool["id"],
                            "type": tool["type"],
                            "function": {"name": tool["name"], "arguments": "".join(tool["args"])},
                        }
                        for _, tool in sorted(slot["tools"].items())
                    ]
                choices.append(
                    {
                        "index": index,
                        "message": message,
                        "finish_reason": slot["finish"],
                        "logprobs": logprobs,
                    }
                )
            else:
                choices.append(
                    {"index": index, "text": text, "finish_reason": slot["finish"], "logprobs": logprobs}
                )
        out: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": head.get("created"),
            "model": head.get("model"),
            "choices": choices,
        }
        if head.get("system_fingerprint"):
            out["system_fingerprint"] = head["system_fingerprint"]
        if self._usage is not None:
            out["usage"] = self._usage
        return out


# Delta and message fields handled by name; any other non-empty string field of a delta (a provider's
# `reasoning_content`, say) is concatenated into the message under its name, and replayed before the answer.
_DELTA_FIELDS = frozenset({"role", "content", "refusal", "function_call", "tool_calls"})


def _str_or_none(mapping: dict[str, Any], *names: str) -> bool:
    return all(isinstance(mapping.get(name), str | None) for name in names)


def _well_formed(choice: Any, *, chat: bool) -> bool:
    """Whether a streamed `choice` has the shape `StreamRecorder` merges (fields it reads, of their types)."""
    if not isinstance(choice, dict) or not _str_or_none(choice, "finish_reason"):
        return False
    index, logprobs = choice.get("index", 0), choice.get("logprobs")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return False
    if logprobs is not None and not isinstance(logprobs, dict):
        return False
    if not chat:
        return _str_or_none(choice, "text")
    delta = choice.get("delta")
    if delta is None:
        return True
    if not isinstance(delta, dict) or not _str_or_none(delta, "role", "content", "refusal"):
        return False
    calls, function = delta.get("tool_calls"), delta.get("function_call")
    if function is not None and not (
        isinstance(function, dict) and _str_or_none(function, "name", "arguments")
    ):
        return False
    if calls is None:
        return True
    return isinstance(calls, list) and all(
        isinstance(call, dict)
        and isinstance(call.get("index", 0), int)
        and _str_or_none(call, "id")
        and isinstance(call.get("function") or {}, dict)
        and _str_or_none(call.get("function") or {}, "name", "arguments")
        for call in calls
    )


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(len(text), start + _PIECE_CHARS)
        cut = text.rfind(" ", start + 1, end) if end < len(text) else -1
        end = cut if cut > start else end
        yield text[start:end]
        start = end


def replay(endpoint: str, response: dict[str, Any], *, include_usage: bool = False) -> Iterator[bytes]:
    """SSE frames that stream `response` (a stored non-streaming answer), ending with ``[DONE]``."""
    chat = endpoint != "completions"
    head = {
        "id": response.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": response.get("created"),
        "model": response.get("model"),
    }
    if response.get("system_fingerprint"):
        head["system_fingerprint"] = response["system_fingerprint"]

    def chunk(index: int, body: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": index, **body, "finish_reason": finish, "logprobs": logprobs}
        return frame(orjson.dumps({**head, "choices": [choice]}))

    for choice in response.get("choices") or []:
        index = int(choice.get("index", 0))
        # Logprobs belong to the whole text: a choice that has them is replayed in one piece, with them.
        logprobs = choice.get("logprobs") or None
        if chat:
            message = choice.get("message") or {}
            content = message.get("content") or ""
            yield chunk(index, {"delta": {"role": message.get("role", "assistant"), "content": ""}})
            for name, value in message.items():  # a reasoning text and the like come before the answer
                if name not in _DELTA_FIELDS and isinstance(value, str) and value:
                    yield chunk(index, {"delta": {name: value}})
            for piece in _pieces(content) if logprobs is None else [content]:
                yield chunk(index, {"delta": {"content": piece}}, logprobs=logprobs)
            if message.get("refusal"):
                yield chunk(index, {"delta": {"refusal": message["refusal"]}})
            if message.get("function_call"):
                yield chunk(index, {"delta": {"function_call": message["function_call"]}})
            if message.get("tool_calls"):
                calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                yield chunk(index, {"delta": {"tool_calls": calls}})
            yield chunk(index, {"delta": {}}, choice.get("finish_reason") or "stop")
        else:
            text = choice.get("text") or ""
            for piece in _pieces(text) if logprobs is None else [text]:
                yield chunk(index, {"text": piece}, logprobs=logprobs)
            yield chunk(index, {"text": ""}, choice.get("finish_reason") or "stop")
    if include_usage and response.get("usage") is not None:
        yield frame(orjson.dumps({**head, "choices": [], "usage": response["usage"]}))
    yield frame(DONE)
