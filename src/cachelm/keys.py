"""Cache keys: canonical request fingerprints, semantic context keys, and chained KV block hashes.

Response keys
-------------
A response key is SHA-256 over a canonical encoding of

    (KEY_SCHEMA_VERSION, tenant salt, endpoint, model revision, every answer-changing request field)

The canonical encoding is JSON with sorted keys, no insignificant whitespace, and numbers normalised
(``1``, ``1.0`` and ``1e0`` encode the same; ``True`` stays a boolean). Text is hashed exactly as sent:
whitespace is *not* normalised, because a changed space can change a model's answer.

Which fields change the answer? Every field of the request does, except those in ``IGNORED_FIELDS``
(transport and bookkeeping: ``stream``, ``user``, ``metadata``…). Unknown fields are therefore part of the
key: a new upstream parameter can cost a hit but can never serve a wrong answer. Fields absent from the
request and fields sent with their documented default (``DEFAULTS``) give the same key. The OpenAI SDK's
``extra_body`` (parameters it sends in the body: ``top_k``, ``guided_json``…) is part of the key as a
field of its own; an empty one is absent.

Keys never contain raw text: only the digest leaves this module.

KV block keys
-------------
``chain_block_hashes`` splits token ids into full blocks and hashes each block together with its parent's
hash, the model fingerprint (id, revision, dtype) and the tenant salt, so equal hashes mean equal prefixes
of the same model for the same tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NewType

import orjson

from cachelm.errors import ConfigError

KEY_SCHEMA_VERSION = 1

# Fields that never change the answer. Everything else in a request is part of its key.
IGNORED_FIELDS: frozenset[str] = frozenset(
    {
        "stream",  # a cached answer can be replayed either way
        "stream_options",
        "user",  # identity is carried by the tenant salt, not the request body
        "metadata",
        "store",
        "service_tier",
        "timeout",
        "extra_headers",
        "extra_query",
        "cache",  # cachelm's own per-request cache control
    }
)

# A field sent with its default value keys the same as an absent field (OpenAI's documented defaults).
DEFAULTS: Mapping[str, Any] = {
    "temperature": 1,
    "top_p": 1,
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": True,
}

# The answer-changing fields cachelm knows by name (documentation and tests; the key uses all fields).
ANSWER_CHANGING_FIELDS: tuple[str, ...] = (
    "model",
    "messages",
    "prompt",
    "suffix",
    "input",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "reasoning_effort",
    "echo",
    "best_of",
    "dimensions",
    "encoding_format",
)

BlockHash = NewType("BlockHash", bytes)


class _Unencodable(Exception):
    """Raised inside `_normalise`; carries the path to the bad value, built only on this error path."""

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason, self.path = reason, path


MAX_DEPTH = 64  # deeper JSON than this is refused: no real request nests so deep, and recursion has a limit


def _normalise_value(value: Any, depth: int = 0) -> Any:
    # Exact type checks first: str/int dominate requests and this runs on every cache lookup.
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _Unencodable(f"must be a finite number, got {value!r}")
        return int(value) if value.is_integer() else value
    if depth > MAX_DEPTH:
        raise _Unencodable(f"nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Unencodable(f"keys must be strings, got {k!r}")
            try:
                out[k] = _normalise_value(v, depth + 1)
            except _Unencodable as exc:
                raise _Unencodable(exc.reason, f".{k}{exc.path}") from None
        return out
    if isinstance(value, list | tuple):
        items = []
        for i, v in enumerate(value):
            try:
                items.append(_normalise_value(v, depth + 1))
            except _Unencodable as exc:
                raise _Unencodable(exc.reason, f"[{i}]{exc.path}") from None
        return items
    if isinstance(value, str | int | float):  # subclasses (e.g. str enums) encode as their base type
        if isinstance(value, int):  # not via float: an int beyond 2**53 would round into another int
            return int.__index__(value)
        return _normalise_value(str.__str__(value) if isinstance(value, str) else float(value))
    raise _Unencodable(f"must be JSON-serialisable, got {type(value).__name__}")


def _normalise(value: Any, path: str) -> Any:
    """Return `value` in canonical form: integral floats become ints, mappings get string keys."""
    try:
        return _normalise_value(value)
    except _Unencodable as exc:
        raise ConfigError(f"`{path}{exc.path}` {exc.reason}") from None


def _dumps(normalised: Any) -> bytes:
    # orjson is ~5x faster and this runs on every lookup. It refuses lone surrogates and integers beyond
    # 64 bits; such values take the json path, which is deterministic too (same request, same bytes).
    try:
        return orjson.dumps(normalised, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(normalised, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8",
            "surrogatepass",  # JSON bodies may carry lone surrogates ("\ud800")
        )


def canonical_json(value: Any) -> bytes:
    """Encode `value` as canonical JSON bytes (sorted keys, compact, normalised numbers, UTF-8)."""
    return _dumps(_normalise(value, "value"))


def canonical_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The answer-changing part of `request`, normalised: ignored fields and default values removed."""
    if not isinstance(request, Mapping):
        raise ConfigError(f"`request` must be a mapping, got {type(request).__name__}")
    out: dict[str, Any] = {}
    for field, value in request.items():
        if not isinstance(field, str):  # as nested keys: json would write 1 as "1", orjson would refuse it
            raise ConfigError(f"`request` keys must be strings, got {field!r}")
        if field in IGNORED_FIELDS or value is None:
            continue
        norm = _normalise(value, field)
        if field in DEFAULTS and norm == DEFAULTS[field] and type(norm) is type(DEFAULTS[field]):
            continue
        if field == "extra_body" and norm == {}:  # the SDK sends nothing for it
            continue
        out[field] = norm
    return out


def tenant_salt(tenant_id: str, secret: bytes = b"") -> bytes:
    """A per-tenant salt: HMAC-SHA256(secret, tenant_id). Equal requests of two tenants never share a key."""
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ConfigError(f"`tenant_id` must be a non-empty string, got {tenant_id!r}")
    try:
        name = tenant_id.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no bytes to salt with
        raise ConfigError(f"`tenant_id` must be valid Unicode text, got {tenant_id!r}") from None
    return hmac.new(secret, name, hashlib.sha256).digest()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        # Length-prefix each part so no two different part lists encode the same bytes.
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def request_key(
    request: Mapping[str, Any],
    *,
    tenant_salt: bytes,
    endpoint: str = "chat.completions",
    model_revision: str = "",
) -> str:
    """The response key (64 hex chars) of `request` for one tenant, endpoint and model revision."""
    body = _dumps(canonical_request(request))  # already normalised
    return _digest(
        str(KEY_SCHEMA_VERSION).encode(), tenant_salt, endpoint.encode(), model_revision.encode(), body
    )


def is_sampled(request: Mapping[str, Any]) -> bool:
    """True when `request` samples (temperature > 0, default 1): its answer is not unique."""
    temperature = request.get("temperature", DEFAULTS["temperature"])
    if temperature is None:
        return True
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ConfigError(f"`temperature` must be a number, got {temperature!r}")
    return float(temperature) > 0


@dataclass(frozen=True, kw_only=True)
class SemanticQuery:
    """A chat request split for semantic matching: free text to embed, and an exact key for the rest."""

    text: str  # the last user turn, the only part matched by meaning
    context_key: str  # digest of everything else: system prompt, earlier turns, model, parameters


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: keep the text parts only
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def semantic_query(
    request: Mapping[str, Any], *, tenant_salt: bytes, endpoint: str = "chat.completions"
) -> SemanticQuery | None:
    """Split `request` into its last user turn and a context key; None when it has no user turn."""
    canon = canonical_request(request)
    messages = canon.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if not isinstance(last, Mapping) or last.get("role") != "user":
            return None
        # Only the text of the last turn is matched by meaning; its other parts (images, audio, a name)
        # and fields stay in the context key, so two questions about different images never match.
        content = last.get("content")
        rest = (
            [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "text")]
            if isinstance(content, list)
            else None
        )
        context = dict(canon, messages=[*messages[:-1], dict(last, content=rest)])
        text = _message_text(last)
    elif isinstance(canon.get("prompt"), str):
        context = dict(canon, prompt=None)
        text = canon["prompt"]
    else:
        return None
    key = _digest(
        b"semantic", str(KEY_SCHEMA_VERSION).encode(), tenant_salt, endpoint.encode(), canonical_json(context)
    )
    return SemanticQuery(text=text, context_key=key)


@dataclass(frozen=True, kw_only=True)
class ModelFingerprint:
    """What makes one model's KV cache different from another's."""

    model_id: str
    revision: str = ""
    dtype: str = ""

    def encode(self) -> bytes:
        return canonical_json([self.model_id, self.revision, self.dtype])


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], *, model: ModelFingerprint, tenant_salt: bytes
) -> BlockHash:
    """SHA-256 of (parent hash, block token ids, model fingerprint, tenant salt)."""
    h = hashlib.sha256()
    h.update(parent if parent is not None else b"\x00" * 32)
    h.update(model.encode())
    h.update(tenant_salt)
    h.update(len(token_ids).to_bytes(4, "big"))
    try:  # one pack for the whole block: hashing runs on every prompt's tokens
        h.update(struct.pack(f">{len(token_ids)}I", *token_ids))
    except struct.error:
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < 2**32), None)
        raise ConfigError(f"`token_ids` must be ints in [0, 2**32), got {bad!r}") from None
    return BlockHash(h.digest())


def chain_block_hashes(
    token_ids: Sequence[int], block_size: int, *, model: ModelFingerprint, tenant_salt: bytes
) -> list[BlockHash]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is not hashed)."""
    if block_size <= 0:
        raise ConfigError(f"`block_size` must be > 0, got {block_size!r}")
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(
            parent, token_ids[start : start + block_size], model=model, tenant_salt=tenant_salt
        )
        hashes.append(parent)
    return hashes
