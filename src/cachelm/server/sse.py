"""Server-sent events: record a streamed answer into one response object, and replay one as a stream.

A miss that streams is forwarded chunk by chunk while `StreamRecorder` collects the chunks. The recorded
answer is stored only when the stream was *complete*: the upstream sent ``[DONE]``, every choice has a
``finish_reason``, and no chunk carried an ``error``. A hit is stored as the ordinary (non-streaming)
response object, so either kind of request can be answered from it; `replay` turns it back into chunks.
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


class StreamRecorder:
    """Collects the chunks of one streamed completion (``chat.completions`` or ``completions``)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
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
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                self.error = True
                return
            self._merge(choice)

    def _merge(self, choice: dict[str, Any]) -> None:
        slot = self._choices.setdefault(
            choice.get("index", 0), {"text": [], "role": None, "tools": {}, "finish": None}
        )
        if choice.get("finish_reason") is not None:
            slot["finish"] = choice["finish_reason"]
        if self.endpoint == "completions":
            slot["text"].append(choice.get("text") or "")
            return
        delta = choice.get("delta") or {}
        slot["role"] = delta.get("role") or slot["role"]
        if delta.get("content"):
            slot["text"].append(delta["content"])
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
        """True when the stream ended with ``[DONE]``, without errors, every choice finished."""
        return (
            self.done
            and not self.error
            and bool(self._choices)
            and all(slot["finish"] is not None for slot in self._choices.values())
        )

    def response(self) -> dict[str, Any]:
        """The recorded answer as a non-streaming response object. Only meaningful when `complete`."""
        head = self._head or {}
        chat = self.endpoint != "completions"
        choices = []
        for index in sorted(self._choices):
            slot = self._choices[index]
            text = "".join(slot["text"])
            if chat:
                message: dict[str, Any] = {"role": slot["role"] or "assistant", "content": text or None}
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
                    {"index": index, "message": message, "finish_reason": slot["finish"], "logprobs": None}
                )
            else:
                choices.append(
                    {"index": index, "text": text, "finish_reason": slot["finish"], "logprobs": None}
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

    def chunk(index: int, body: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, **body, "finish_reason": finish, "logprobs": None}
        return frame(orjson.dumps({**head, "choices": [choice]}))

    for choice in response.get("choices") or []:
        index = int(choice.get("index", 0))
        if chat:
            message = choice.get("message") or {}
            yield chunk(index, {"delta": {"role": message.get("role", "assistant"), "content": ""}})
            for piece in _pieces(message.get("content") or ""):
                yield chunk(index, {"delta": {"content": piece}})
            if message.get("tool_calls"):
                calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                yield chunk(index, {"delta": {"tool_calls": calls}})
            yield chunk(index, {"delta": {}}, choice.get("finish_reason") or "stop")
        else:
            for piece in _pieces(choice.get("text") or ""):
                yield chunk(index, {"text": piece})
            yield chunk(index, {"text": ""}, choice.get("finish_reason") or "stop")
    if include_usage and response.get("usage") is not None:
        yield frame(orjson.dumps({**head, "choices": [], "usage": response["usage"]}))
    yield frame(DONE)
