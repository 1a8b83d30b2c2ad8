"""JSONL export and import of cache entries (backups, migrations between stores, pre-seeding).

One JSON object per line, in one of two shapes:

*Entry lines* (what `export_jsonl` writes) carry a stored record as it is::

    {"key": "<hex>", "tenant": "default", "user": "", "tags": ["faq"], "model": "gpt-4o-mini",
     "created": 1732377600.0, "expires": null, "hits": 3, "response": {...}}

``response`` is the decoded JSON value; a value that is not compact UTF-8 JSON (encrypted bytes, another
encoder's output) is written as ``value_b64`` (base64) instead, so an import restores every value byte for
byte. Keys depend on the cache's ``key_secret`` and model revisions, so entry lines are for
moving a cache between stores of the same deployment.

*Seed lines* pre-seed a static cache from request/answer pairs; the key is computed on import::

    {"request": {"model": "gpt-4o-mini", "messages": [...], "temperature": 0},
     "response": {...}, "tenant": "default", "user": "", "tags": ["faq"], "ttl": 86400,
     "endpoint": "chat.completions"}

Import validates every line before writing anything: a malformed line raises `ConfigError` naming its
line number (``line 7: `created` must be a number, got 'yesterday'``) and the store is left untouched.
Entries already expired are skipped. Records are written one by one; if the store fails midway the
import raises `BackendError`, and running it again is safe (a put replaces the record under its key).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from cachelm.errors import ConfigError
from cachelm.keys import is_sampled
from cachelm.response.exact import cacheable_response
from cachelm.store.base import Match, Record

if TYPE_CHECKING:
    from cachelm.response.exact import ExactCache

ENTRY_FIELDS = frozenset(
    {"key", "tenant", "user", "tags", "model", "created", "expires", "hits", "response", "value_b64"}
)
SEED_FIELDS = frozenset({"request", "response", "tenant", "user", "tags", "ttl", "endpoint", "allow_sampled"})
MAX_ERRORS_SHOWN = 5


def record_to_line(record: Record) -> str:
    """One entry line (no trailing newline) for `record`."""
    line: dict[str, Any] = {
        "key": record.key,
        "tenant": record.tenant,
        "user": record.user,
        "tags": sorted(record.tags),
        "model": record.model,
        "created": record.created,
        "expires": record.expires,
        "hits": record.hits,
    }
    response = _json_value(record.value)
    if response is _NOT_JSON:
        line["value_b64"] = base64.b64encode(record.value).decode()
    else:
        line["response"] = response
    # Key order is kept (not sorted): the import re-encodes `response` to the very bytes that were stored.
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_NOT_JSON = object()


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _json_value(raw: bytes) -> Any:
    """The JSON value `raw` holds if re-encoding it gives `raw` back byte for byte, else `_NOT_JSON`."""
    try:
        value = json.loads(raw.decode())
        return value if _encode(value) == raw else _NOT_JSON
    except (UnicodeDecodeError, ValueError):
        return _NOT_JSON


def export_jsonl(cache: ExactCache, fp: IO[str], where: Match | None = None) -> int:
    """Write every live record of `cache.backend` matching `where` to `fp`; returns how many."""
    count = 0
    for record in cache.backend.scan(where):
        fp.write(record_to_line(record) + "\n")
        count += 1
    return count


class _LineError(Exception):
    pass


def _number(obj: Mapping[str, Any], name: str, *, optional: bool = False) -> float | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _LineError(f"`{name}` must be a number, got {value!r}")
    return float(value)


def _string(obj: Mapping[str, Any], name: str, default: str | None = None, *, empty: bool = False) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str) or (not value and not empty):
        raise _LineError(f"`{name}` must be a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def _tags(obj: Mapping[str, Any]) -> frozenset[str]:
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise _LineError(f"`tags` must be a list of non-empty strings, got {tags!r}")
    return frozenset(tags)


def _entry_record(obj: Mapping[str, Any]) -> Record:
    unknown = set(obj) - ENTRY_FIELDS
    if unknown:
        raise _LineError(f"unknown field `{sorted(unknown)[0]}`")
    if ("response" in obj) == ("value_b64" in obj):
        raise _LineError("an entry needs exactly one of `response` and `value_b64`")
    if "response" in obj:
        try:
            value = _encode(obj["response"])
        except ValueError as exc:
            raise _LineError(f"`response` is not valid JSON: {exc}") from None
    else:
        try:
            value = base64.b64decode(_string(obj, "value_b64", empty=True), validate=True)
        except binascii.Error:
            raise _LineError("`value_b64` is not valid base64") from None
    hits = obj.get("hits", 0)
    if isinstance(hits, bool) or not isinstance(hits, int) or hits < 0:
        raise _LineError(f"`hits` must be an integer >= 0, got {hits!r}")
    created = _number(obj, "created")
    expires = _number(obj, "expires", optional=True)
    assert created is not None  # not optional
    if expires is not None and expires < created:
        raise _LineError(f"`expires` ({expires}) is before `created` ({created})")
    return Record(
        key=_string(obj, "key"),
        value=value,
        tenant=_string(obj, "tenant", "default"),
        user=_string(obj, "user", "", empty=True),
        tags=_tags(obj),
        model=_string(obj, "model", "", empty=True),
        created=created,
        expires=expires,
        hits=hits,
    )


def _seed_record(cache: ExactCache, obj: Mapping[str, Any]) -> Record:
    unknown = set(obj) - SEED_FIELDS
    if unknown:
        raise _LineError(f"unknown field `{sorted(unknown)[0]}`")
    request, response = obj.get("request"), obj.get("response")
    endpoint = _string(obj, "endpoint", "chat.completions")
    if not isinstance(request, dict):
        raise _LineError(f"`request` must be a JSON object, got {type(request).__name__}")
    if not cacheable_response(response, endpoint):
        raise _LineError(f"`response` is not a complete, successful {endpoint} answer")
    if is_sampled(request) and obj.get("allow_sampled") is not True:
        raise _LineError(
            "`request` samples (temperature > 0 or absent); set `allow_sampled: true` to seed it"
        )
    ttl = _number(obj, "ttl", optional=True)
    if ttl is not None and ttl <= 0:
        raise _LineError(f"`ttl` must be > 0, got {ttl!r}")
    tenant = _string(obj, "tenant", "default")
    assert isinstance(response, Mapping)
    try:
        key = cache.key_for(request, tenant=tenant, endpoint=endpoint)
        return cache.make_record(
            key,
            request,
            response,
            tenant=tenant,
            user=_string(obj, "user", "", empty=True),
            tags=_tags(obj),
            ttl=ttl,
        )
    except ConfigError as exc:
        raise _LineError(str(exc)) from None


def parse_jsonl(cache: ExactCache, fp: IO[str]) -> list[Record]:
    """Parse and validate every line of `fp`; raises ConfigError listing the bad lines (1-based)."""
    records: list[Record] = []
    errors: list[str] = []
    for number, line in enumerate(fp, start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise _LineError(f"not valid JSON ({exc.args[0].split(':')[0]})") from None
            if not isinstance(obj, dict):
                raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
            records.append(_seed_record(cache, obj) if "request" in obj else _entry_record(obj))
        except (_LineError, ConfigError) as exc:
            errors.append(f"line {number}: {exc}")
    if errors:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ConfigError(f"{shown}{more}; nothing was imported")
    return records


def import_jsonl(cache: ExactCache, fp: IO[str]) -> int:
    """Validate all of `fp`, then write its live entries to `cache.backend`; returns how many were written."""
    now = cache.clock()
    written = 0
    for record in parse_jsonl(cache, fp):
        if record.expired(now):
            continue
        cache.backend.put(record)
        written += 1
    return written
