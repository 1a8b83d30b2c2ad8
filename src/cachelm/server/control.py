"""Per-request cache control and request validation for the proxy.

Cache control comes from headers or from the request body's ``cache`` object (``keys.py`` leaves that field
out of the key); a header wins over the body when both are given:

=====================  ========================  ==================================================
header                 body ``cache`` field      meaning
=====================  ========================  ==================================================
x-cachelm-bypass       ``bypass: bool``          neither read nor write the cache
x-cachelm-refresh      ``refresh: bool``         skip the read, call upstream, overwrite the entry
x-cachelm-ttl          ``ttl: seconds``          lifetime of the entry this request writes
x-cachelm-semantic     ``semantic: bool``        semantic lookup on or off (``on|off``)
x-cachelm-delta        ``delta: float``          the semantic decision's error bound δ in (0, 1)
x-cachelm-sampled      ``sampled: bool``         allow serving/storing a sampled (temperature > 0) answer
x-cachelm-tags         ``tags: [str]``           tags stored with the entry (comma separated header)
=====================  ========================  ==================================================

Invalid values raise `RequestError` (a 400 whose message names the header or field and shows the value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})
MAX_TTL_S = 10 * 365 * 86_400.0
MAX_TAGS = 16
MAX_DIMENSIONS = 16_384  # larger than any embedding model's output


class RequestError(Exception):
    """A client error: `status` (4xx), a message naming the bad input, and the OpenAI error `param`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code or ("invalid_request_error" if status == 400 else "error")


@dataclass(frozen=True, slots=True)
class CacheControl:
    """What one request asks of the cache. Defaults: read and write, server-default semantic setting."""

    bypass: bool = False
    refresh: bool = False
    ttl: float | None = None
    semantic: bool | None = None
    delta: float | None = None
    sampled: bool = False
    tags: tuple[str, ...] = ()


DEFAULT_CONTROL = CacheControl()


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RequestError(f"`{name}` must be on/off (true/false), got {value!r:.40}", param=name)


def _number(value: Any, name: str, low: float, high: float, *, open_low: bool = True) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    ok = math.isfinite(number) and (number > low if open_low else number >= low) and number <= high
    if not ok:
        raise RequestError(f"`{name}` must be a number in ({low}, {high}], got {value!r:.40}", param=name)
    return number


def _tags(value: Any, name: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or len(items) > MAX_TAGS:
        raise RequestError(f"`{name}` must be a list of at most {MAX_TAGS} strings", param=name)
    out = []
    for item in items:
        if not isinstance(item, str) or not 0 < len(item.strip()) <= 64:
            raise RequestError(
                f"`{name}` entries must be 1-64 character strings, got {item!r:.40}", param=name
            )
        out.append(item.strip())
    return tuple(out)


_FIELDS = {
    "bypass": ("x-cachelm-bypass", _flag),
    "refresh": ("x-cachelm-refresh", _flag),
    "semantic": ("x-cachelm-semantic", _flag),
    "sampled": ("x-cachelm-sampled", _flag),
}


def parse_control(headers: Mapping[str, str], body: Mapping[str, Any]) -> CacheControl:
    """The cache control of one request from its headers and its body's ``cache`` object."""
    options = body.get("cache")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise RequestError(f"`cache` must be an object, got {type(options).__name__}", param="cache")
    unknown = set(options) - {*_FIELDS, "ttl", "delta", "tags"}
    if unknown:
        raise RequestError(f"`cache` has unknown fields: {sorted(unknown)}", param="cache")
    if not options and not any(h.startswith("x-cachelm-") for h in headers):
        return DEFAULT_CONTROL  # the common case costs one scan of the header names
    values: dict[str, Any] = {}
    for field, (header, parse) in _FIELDS.items():
        raw = headers.get(header)
        if raw is not None:
            values[field] = parse(raw, header)
        elif field in options:
            values[field] = parse(options[field], f"cache.{field}")
    for field, header, low, high in (
        ("ttl", "x-cachelm-ttl", 0.0, MAX_TTL_S),
        ("delta", "x-cachelm-delta", 0.0, 1.0),
    ):
        raw = headers.get(header)
        if raw is not None:
            values[field] = _number(raw, header, low, high)
        elif options.get(field) is not None:
            values[field] = _number(options[field], f"cache.{field}", low, high)
    if values.get("delta") == 1.0:
        raise RequestError("`delta` must be < 1", param="x-cachelm-delta")
    if headers.get("x-cachelm-tags") is not None:
        values["tags"] = _tags(headers["x-cachelm-tags"], "x-cachelm-tags")
    elif options.get("tags") is not None:
        values["tags"] = _tags(options["tags"], "cache.tags")
    return CacheControl(**values)


# -- request bodies ---------------------------------------------------------------------------------------

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _require_model(body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 256:
        raise RequestError(f"`model` must be a non-empty string, got {model!r:.60}", param="model")


def _check_common(body: Mapping[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"`stream` must be a boolean, got {stream!r:.40}", param="stream")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128):
        raise RequestError(f"`n` must be an integer in [1, 128], got {n!r:.40}", param="n")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise RequestError(f"`{name}` must be a number, got {value!r:.40}", param=name)
    for name in ("max_tokens", "max_completion_tokens", "seed"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"`{name}` must be an integer, got {value!r:.40}", param=name)
    _check_user(body)


def request_user(headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """The user a request's entries belong to (erasure): the ``x-cachelm-user`` header, else the body's
    ``user`` (checked by the endpoint's validation), else ""."""
    header = headers.get("x-cachelm-user")
    if header:
        if len(header) > 256:
            raise RequestError("`x-cachelm-user` must be at most 256 characters", param="x-cachelm-user")
        return header
    user = body.get("user")
    return user if isinstance(user, str) else ""


def _check_user(body: Mapping[str, Any]) -> None:
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise RequestError("`user` must be a string of at most 256 characters", param="user")


def validate_chat(body: Mapping[str, Any]) -> None:
    """Raise RequestError unless `body` is a well-formed chat completion request."""
    _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"`messages[{i}]` must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"`messages[{i}].role` must be one of {sorted(_ROLES)}, got {role!r:.40}",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise RequestError(
                f"`messages[{i}].content` must be a string, a list of parts or null",
                param=f"messages[{i}].content",
            )
    _check_common(body)


def validate_completion(body: Mapping[str, Any]) -> None:
    """Raise RequestError unless `body` is a well-formed (legacy) completion request."""
    _require_model(body)
    prompt = body.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
        raise RequestError("`prompt` must be a string or a non-empty list", param="prompt")
    _check_common(body)


def embedding_inputs(body: Mapping[str, Any]) -> list[str] | None:
    """The texts of an embeddings request (None for token ids); RequestError if malformed."""
    _require_model(body)
    _check_user(body)
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= MAX_DIMENSIONS
    ):
        raise RequestError(
            f"`dimensions` must be an integer in [1, {MAX_DIMENSIONS}], got {dimensions!r:.40}",
            param="dimensions",
        )
    data = body.get("input")
    if isinstance(data, str):
        return [data]
    if isinstance(data, list) and data and len(data) <= 2048:
        if all(isinstance(x, str) for x in data):
            return list(data)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in data) or all(
            isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
            for x in data
        ):
            return None
    raise RequestError("`input` must be a string, a list of 1-2048 strings, or token ids", param="input")
