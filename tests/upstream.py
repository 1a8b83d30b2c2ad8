"""`OpenAIUpstream`: a real local HTTP server speaking the OpenAI protocol, for integration tests.

It is not a mock: it is a Starlette app served by uvicorn on a free port of 127.0.0.1, in a background
thread, and clients (the `openai` SDK, httpx, the cachelm proxy) reach it over real TCP.

    upstream = OpenAIUpstream()
    base_url = upstream.start()              # "http://127.0.0.1:PORT/v1"
    client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0)
    ...
    assert upstream.count("/v1/chat/completions") == 1
    upstream.stop()

or as a context manager (``with OpenAIUpstream() as base_url: ...``). Tests take the `upstream` fixture of
tests/conftest.py (one server per test).

Endpoints (all deterministic: the same request body always gets the same answer):

- ``POST /v1/chat/completions`` — content ``"Echo from <model>: <last user text>"``; ``n`` choices (choice
  *i* > 0 appends ``" #i"``); ``max_tokens`` / ``max_completion_tokens`` cut the answer to that many words
  with ``finish_reason="length"``; ``usage`` counts words. ``stream=True`` answers with SSE chunks (one per
  word), a usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``.
- ``POST /v1/completions`` — text ``"Echo from <model>: <prompt>"``, same rules, streaming too.
- ``POST /v1/embeddings`` — unit vectors from SHA-256 of each input (``dimensions``, default 8);
  ``encoding_format="base64"`` (the SDK's default) returns little-endian float32 base64.
- ``GET /v1/models`` — a fixed list.
- ``POST /_control/fault`` ``{"fault": "...", "times": n}`` — queue a fault for the next `n` API calls
  (from another process); ``POST /_control/reset`` clears calls and faults.

Fault injection (a comma-separated spec, e.g. ``"delay=0.2,status=503"``), applied to one request via the
``X-Upstream-Fault`` header, or queued for the next calls with `inject` / ``/_control/fault``:

- ``status=N``      answer HTTP N with an OpenAI-shaped error body (no answer);
- ``delay=S``       wait S seconds before answering;
- ``chunk_delay=S`` wait S seconds between stream chunks;
- ``cut=K``         stream K chunks, then drop the connection abruptly (the client sees a broken body);
- ``truncate=K``    stream K chunks, then end the body cleanly without a finish chunk or ``[DONE]``.

Every API call (not control calls) is recorded in `calls` before any fault applies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CREATED = 1_700_000_000
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")


@dataclass(frozen=True)
class Call:
    """One API request the upstream received."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True)
class Fault:
    status: int | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    cut: int | None = None
    truncate: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse ``"status=503,delay=0.1"``; raises ValueError on an unknown or malformed part."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, raw = part.partition("=")
            if name in ("status", "cut", "truncate"):
                fields[name] = int(raw)
            elif name in ("delay", "chunk_delay"):
                fields[name] = float(raw)
            else:
                raise ValueError(f"unknown fault {part!r}")
        return cls(**fields)


class _Cut(Exception):
    """Raised inside a streaming body to make the server drop the connection mid-response."""


def _words(text: str) -> list[str]:
    return text.split()


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content)
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(_words(str(m.get("content", "")))) for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", "")
    return len(_words(prompt if isinstance(prompt, str) else " ".join(map(str, prompt))))


def _answer_id(prefix: str, body: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return f"{prefix}-{digest}"


def _choices_text(body: dict[str, Any], base: str) -> list[tuple[str, str]]:
    """[(text, finish_reason)] per choice, honouring n and max_tokens (in words)."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    out = []
    for i in range(int(body.get("n") or 1)):
        words = _words(base + (f" #{i}" if i else ""))
        finish = "stop"
        if isinstance(limit, int) and len(words) > limit:
            words, finish = words[:limit], "length"
        out.append((" ".join(words), finish))
    return out


def chat_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The full (non-streamed) chat completion the upstream gives for `body`."""
    choices = _choices_text(body, f"Echo from {body.get('model')}: {_last_user_text(body.get('messages'))}")
    completion = sum(len(_words(text)) for text, _ in choices)
    return {
        "id": _answer_id("chatcmpl", body),
        "object": "chat.completion",
        "created": CREATED,
        "model": body.get("model"),
        "system_fingerprint": "fp_upstream",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": _prompt_tokens(body),
            "completion_tokens": completion,
            "total_tokens": _prompt_tokens(body) + completion,
        },
    }


def completion_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The full (non-streamed) legacy completion the upstream gives for `body`."""
    prompt = body.get("prompt", "")
    choices = _choices_text(body, f"Echo from {body.get('model')}: {prompt}")
    completion = sum(len(_words(text)) for text, _ in choices)
    return {
        "id": _answer_id("cmpl", body),
        "object": "text_completion",
        "created": CREATED,
        "model": body.get("model"),
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": _prompt_tokens(body),
            "completion_tokens": completion,
            "total_tokens": _prompt_tokens(body) + completion,
        },
    }


def embedding_vector(text: str, dimensions: int = 8) -> list[float]:
    """A deterministic unit vector for `text` (SHA-256 counter mode → floats in [-1, 1])."""
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(dimensions // 8 + 1))
    values = [raw[4 * i] / 127.5 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _chat_chunks(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    full = chat_answer(body)
    base = {"id": full["id"], "object": "chat.completion.chunk", "created": CREATED, "model": full["model"]}
    base["system_fingerprint"] = full["system_fingerprint"]
    for choice in full["choices"]:
        i = choice["index"]
        delta = {"role": "assistant", "content": ""}
        yield {**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
        for n, word in enumerate(_words(choice["message"]["content"])):
            piece = word if n == 0 else " " + word
            yield {
                **base,
                "choices": [
                    {"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                ],
            }
        yield {
            **base,
            "choices": [
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
            ],
        }
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": full["usage"]}


def _completion_chunks(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    full = completion_answer(body)
    base = {"id": full["id"], "object": "text_completion", "created": CREATED, "model": full["model"]}
    for choice in full["choices"]:
        i = choice["index"]
        for n, word in enumerate(_words(choice["text"])):
            piece = word if n == 0 else " " + word
            yield {**base, "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}]}
        yield {
            **base,
            "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}],
        }
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": full["usage"]}


class OpenAIUpstream:
    """A real OpenAI-protocol server in a background thread. See the module docstring."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._faults: deque[Fault] = deque()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/_control/fault", self._control_fault, methods=["POST"]),
                Route("/_control/reset", self._control_reset, methods=["POST"]),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:PORT/v1``) once the port accepts."""
        if self._server is not None:
            return self.base_url
        config = uvicorn.Config(
            self.app, host=self.host, port=self._port, log_level="critical", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="openai-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the upstream test server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://{self.host}:{port}/v1"
        return self.base_url

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation and control -----------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every API call received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._calls)

    def count(self, path: str | None = None) -> int:
        """How many API calls were received (for one path such as ``"/v1/chat/completions"``, or all)."""
        with self._lock:
            return sum(1 for c in self._calls if path is None or c.path == path)

    def inject(self, fault: str, times: int = 1) -> None:
        """Apply `fault` (a spec like ``"status=503"``) to the next `times` API calls."""
        parsed = Fault.parse(fault)
        with self._lock:
            self._faults.extend([parsed] * times)

    def reset(self) -> None:
        """Forget recorded calls and queued faults."""
        with self._lock:
            self._calls.clear()
            self._faults.clear()

    # -- request handling ------------------------------------------------------------------------------

    async def _receive(self, request: Request) -> tuple[dict[str, Any], Fault]:
        body = await request.json()
        with self._lock:
            self._calls.append(Call(request.url.path, body, dict(request.headers)))
            queued = self._faults.popleft() if self._faults else None
        header = request.headers.get("x-upstream-fault")
        fault = Fault.parse(header) if header else (queued or Fault())
        if fault.delay:
            await asyncio.sleep(fault.delay)
        return body, fault

    @staticmethod
    def _error(status: int) -> Response:
        kind = "rate_limit_exceeded" if status == 429 else "server_error"
        body = {"error": {"message": f"injected fault: HTTP {status}", "type": kind, "code": kind}}
        # As OpenAI answers a rate limit: when to retry, and the limits behind it.
        limited = {"retry-after": "7", "retry-after-ms": "7000", "x-ratelimit-remaining-requests": "0"}
        return JSONResponse(body, status_code=status, headers=limited if status == 429 else None)

    def _stream(self, chunks: Iterator[dict[str, Any]], fault: Fault) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for n, chunk in enumerate(chunks):
                if fault.cut is not None and n >= fault.cut:
                    raise _Cut("injected stream cut")
                if fault.truncate is not None and n >= fault.truncate:
                    return
                if fault.chunk_delay:
                    await asyncio.sleep(fault.chunk_delay)
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _chat(self, request: Request) -> Response:
        body, fault = await self._receive(request)
        if fault.status:
            return self._error(fault.status)
        if body.get("stream"):
            return self._stream(_chat_chunks(body), fault)
        return JSONResponse(chat_answer(body))

    async def _completions(self, request: Request) -> Response:
        body, fault = await self._receive(request)
        if fault.status:
            return self._error(fault.status)
        if body.get("stream"):
            return self._stream(_completion_chunks(body), fault)
        return JSONResponse(completion_answer(body))

    async def _embeddings(self, request: Request) -> Response:
        body, fault = await self._receive(request)
        if fault.status:
            return self._error(fault.status)
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dims = int(body.get("dimensions") or 8)
        data = []
        for i, text in enumerate(texts):
            vector = embedding_vector(str(text), dims)
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(len(_words(str(t))) for t in texts)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _models(self, request: Request) -> Response:
        with self._lock:
            self._calls.append(Call(request.url.path, {}, dict(request.headers)))
        data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "upstream"} for m in MODELS]
        return JSONResponse({"object": "list", "data": data})

    async def _control_fault(self, request: Request) -> Response:
        body = await request.json()
        try:
            self.inject(str(body["fault"]), int(body.get("times", 1)))
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        return JSONResponse({"ok": True})

    async def _control_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})
