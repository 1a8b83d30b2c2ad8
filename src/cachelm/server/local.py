"""The local-engine upstream: `cachelm.engine.Engine` (HF transformers + KV prefix cache) behind the
OpenAI protocol, so ``cachelm serve`` answers on a fresh machine with no upstream at all.

The engine serves one request at a time (its model cache is not shared between requests), so calls are
queued on one worker thread; streaming pushes tokens from that thread to the event loop as they come.
The KV prefix cache is keyed by the caller's tenant, like every other layer, and `erase_tenant_kv` (called
by ``/admin/erase``) deletes a tenant's KV blocks from every tier of it.

OpenAI parameters honoured: ``max_tokens``/``max_completion_tokens`` (>= 1, default 256, at most 2,048),
``temperature`` (0 to 2), ``top_p`` (0 to 1; 0 keeps only the most likely token), ``seed``, ``stop``
(strings, applied to the generated text); chat content may be a list of text parts (joined with newlines).
``n > 1`` and the fields that would change the answer but are not implemented (logprobs, logit_bias,
penalties, tools, a response_format other than text, echo, best_of > 1, suffix) are refused with a 400
naming the parameter, unless they hold their no-op value. ``/v1/embeddings`` is answered by a local
`Embedder` (by default the packaged all-MiniLM-L6-v2, loaded on first use) under its own model id.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import orjson

from cachelm.errors import ConfigError
from cachelm.keys import tenant_salt as make_salt
from cachelm.server.upstream import UpstreamError

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 2048


class RequestRefused(Exception):
    """A request the local engine cannot serve; carries the HTTP status and OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = orjson.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        )


# Fields that change the answer and that the engine does not implement, with the values that ask for
# nothing: any other value is refused, so a client never takes an answer made without what it asked for.
_NO_OPS: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,),  # chat: a bool; completions: an int, and 0 still asks for the chosen tokens'
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
}


def _is_no_op(value: Any, no_ops: tuple[Any, ...]) -> bool:
    # 0 == False in Python: a bool only matches a bool, so completions' `logprobs: 0` is no `False`.
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in no_ops)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, no_ops in _NO_OPS.items():
        if not _is_no_op(body.get(name), no_ops):
            raise RequestRefused(f"the local engine does not support `{name}`", param=name)


def _number(body: dict[str, Any], name: str, default: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise RequestRefused(f"`{name}` must be a number in [0, {high:g}], got {value!r:.40}", param=name)
    return float(value)


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins, as at OpenAI
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestRefused(f"`{name}` must be an integer >= 1, got {value!r:.40}", param=name)
        return min(value, MAX_TOKENS)
    return DEFAULT_MAX_TOKENS


def _text_message(index: int, message: dict[str, Any]) -> dict[str, Any]:
    """`message` with a content given as parts turned into its text (chat templates render strings)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts: list[Any] = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
        raise RequestRefused(
            f"the local engine reads only text parts of `messages[{index}].content`",
            param=f"messages[{index}].content",
        )
    return {**message, "content": "\n".join(texts)}  # joined as vLLM joins them


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestRefused("`stop` must be a non-empty string or a list of at most 4", param="stop")
    return stops


class LocalEngineUpstream:
    """An `Upstream` answering with a local `Engine`. Build with `load` (a packaged model) or directly."""

    def __init__(
        self,
        engine: Any,
        *,
        model_id: str,
        key_secret: bytes = b"",
        embedder: Callable[[], Any] | None = None,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self._make_embedder = embedder  # called once, on the first embeddings request
        self._embedder: Any = None
        self.name = f"local:{model_id}"
        self._secret = key_secret
        # One thread: the engine runs one generation at a time; queued requests wait their turn.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachelm-engine")

    @classmethod
    def load(cls, name: str, *, device: str = "cpu", key_secret: bytes = b"") -> LocalEngineUpstream:
        """Load a packaged model (``smollm2``, ``gemma3``), a GGUF file or a directory; add a prefix cache."""
        from cachelm.engine.engine import Engine, build_prefix_cache
        from cachelm.engine.loader import load_model

        try:
            model, tokenizer = load_model(name, device=device)
        except Exception as exc:  # a missing package, a failed download, a corrupt file: say which model
            raise ConfigError(
                f"cannot load the local model {name!r} ({type(exc).__name__}: {exc}); "
                "start with `--upstream URL` to proxy an OpenAI-compatible endpoint instead"
            ) from exc
        engine = Engine(model, tokenizer, prefix_cache=build_prefix_cache(model, model_id=name))

        def minilm() -> Any:
            from cachelm.semantic.embedder import MiniLMEmbedder

            return MiniLMEmbedder(device=device)

        return cls(engine, model_id=name, key_secret=key_secret, embedder=minilm)

    # -- request translation ---------------------------------------------------------------------------

    def _params(self, body: dict[str, Any]) -> Any:
        from cachelm.engine.engine import SamplingParams

        if body.get("model") != self.model_id:
            raise RequestRefused(
                f"model {body.get('model')!r} is not served here; the local engine serves {self.model_id!r}",
                status=404,
                param="model",
            )
        if body.get("n") not in (None, 1):
            raise RequestRefused("the local engine supports only `n` = 1", param="n")
        _refuse_unsupported(body)
        temperature = _number(body, "temperature", 1.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 1.0)
        if top_p == 0:  # OpenAI takes 0: only the most likely token is left, which is greedy decoding
            temperature, top_p = 0.0, 1.0
        try:
            return SamplingParams(
                max_new_tokens=_max_tokens(body), temperature=temperature, top_p=top_p, seed=body.get("seed")
            )
        except ConfigError as exc:  # only `seed` is left unchecked here
            raise RequestRefused(str(exc), param="seed") from None

    def _prompt(self, path: str, body: dict[str, Any]) -> Any:
        if path == "chat/completions":
            return [_text_message(i, m) for i, m in enumerate(body["messages"])]
        if path == "completions":
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestRefused("the local engine takes one string `prompt`", param="prompt")
            return prompt
        raise RequestRefused(f"the local engine does not serve `/v1/{path}`", status=404)

    def _events(self, path: str, body: dict[str, Any], tenant: str) -> Iterator[tuple[str, str | None, Any]]:
        """(text delta, finish reason or None, result) per generated token; runs on the engine thread."""
        from cachelm.engine.engine import GenerationResult

        params, prompt, stops = self._params(body), self._prompt(path, body), _stops(body)
        result = GenerationResult(
            text="", token_ids=[], num_prompt_tokens=0, num_cached_tokens=0, finish_reason="length",
            ttft_s=0.0, total_s=0.0,
        )  # fmt: skip
        text, emitted = "", 0  # emitted: characters of `text` already handed out
        salt = make_salt(tenant, self._secret)
        try:
            stream = self.engine.stream(prompt, params, tenant_salt=salt, result=result)
        except ConfigError as exc:  # the prompt: empty, or too long for the model's context
            param = "messages" if path == "chat/completions" else "prompt"
            raise RequestRefused(str(exc), param=param) from None
        for event in stream:
            text += event.text
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                yield text[emitted:cut], "stop", result
                stream.close()
                return
            # Hold back a tail that could still become a stop string, so no part of one is ever sent.
            held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = max(emitted, len(text) - held)
            yield text[emitted:safe], None, result
            emitted = safe
        yield text[emitted:], result.finish_reason, result

    def _envelope(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        chat = path == "chat/completions"
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
        }

    @staticmethod
    def _usage(result: Any) -> dict[str, int]:
        completion = len(result.token_ids)
        return {
            "prompt_tokens": result.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.num_prompt_tokens + completion,
            # OpenAI's field for prompt tokens served from a prefix cache: here, the KV prefix cache.
            "prompt_tokens_details": {"cached_tokens": result.num_cached_tokens},
        }

    def _complete(self, path: str, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        text, finish, result = "", "length", None
        for delta, reason, produced in self._events(path, body, tenant):
            text, finish, result = text + delta, reason or finish, produced
        out = self._envelope(path, body)
        if path == "chat/completions":
            out["object"] = "chat.completion"
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        out["choices"] = [{**choice, "finish_reason": finish, "logprobs": None}]
        out["usage"] = self._usage(result)
        return out

    def _embed(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._make_embedder is None:
            raise RequestRefused("the local engine serves no embeddings model", status=404)
        if self._embedder is None:
            self._embedder = self._make_embedder()
        embedder = self._embedder
        if body.get("model") != embedder.model_id:
            raise RequestRefused(
                f"model {body.get('model')!r} is not served here; local embeddings: {embedder.model_id!r}",
                status=404,
                param="model",
            )
        if body.get("dimensions") not in (None, embedder.dim):
            raise RequestRefused(
                f"`dimensions` must be {embedder.dim} for {embedder.model_id}", param="dimensions"
            )
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestRefused(
                "local embeddings take a string or a list of strings as `input`", param="input"
            )
        vectors = embedder.embed(texts)
        data = []
        for i, vector in enumerate(vectors):
            value: Any = (
                base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
                if body.get("encoding_format") == "base64"
                else [float(x) for x in vector]
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": embedder.model_id,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    # -- Upstream protocol -----------------------------------------------------------------------------

    async def post(self, path: str, body: bytes, *, tenant: str = "default") -> tuple[int, bytes]:
        try:
            request = orjson.loads(body)
            if path == "embeddings":
                answer = await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, request)
                return 200, orjson.dumps(answer)
            answer = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._complete, path, request, tenant
            )
        except RequestRefused as exc:
            return exc.status, exc.body
        except Exception as exc:  # the engine failed (out of memory, …): named as a streamed request names it
            raise UpstreamError(f"local engine failed: {type(exc).__name__}: {exc}", status=500) from exc
        return 200, orjson.dumps(answer)

    async def stream(self, path: str, body: bytes, *, tenant: str = "default") -> AsyncIterator[bytes]:
        request = orjson.loads(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str | None, Any] | BaseException | None] = asyncio.Queue()

        def produce() -> None:
            try:
                for item in self._events(path, request, tenant):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as exc:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        self._pool.submit(produce)
        head = self._envelope(path, request)
        chat = path == "chat/completions"
        include_usage = (request.get("stream_options") or {}).get("include_usage") is True
        first, result = True, None
        while (item := await queue.get()) is not None:
            if isinstance(item, RequestRefused):
                raise UpstreamError(str(item), status=item.status, body=item.body)
            if isinstance(item, BaseException):
                raise UpstreamError(f"local engine failed: {type(item).__name__}: {item}", status=500)
            delta, finish, result = item
            if chat:
                message = {"role": "assistant", "content": delta} if first else {"content": delta}
                choice: dict[str, Any] = {"index": 0, "delta": message if delta or first else {}}
            else:
                choice = {"index": 0, "text": delta}
            first = False
            yield orjson.dumps({**head, "choices": [{**choice, "finish_reason": finish, "logprobs": None}]})
        if include_usage and result is not None:
            yield orjson.dumps({**head, "choices": [], "usage": self._usage(result)})
        yield b"[DONE]"

    def erase_tenant_kv(self, tenant: str) -> int:
        """Delete every KV block computed for `tenant`'s prompts; returns how many (0 without a cache).

        KV blocks are keyed by tenant, not by user: erasing one user drops the whole tenant's KV, which
        costs recomputation, never a wrong answer."""
        cache = self.engine.prefix_cache
        return 0 if cache is None else int(cache.purge_tenant(make_salt(tenant, self._secret)))

    async def models(self) -> dict[str, Any]:
        data = [{"id": self.model_id, "object": "model", "owned_by": "cachelm"}]
        if self._embedder is not None:
            data.append({"id": self._embedder.model_id, "object": "model", "owned_by": "cachelm"})
        return {"object": "list", "data": data}

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
