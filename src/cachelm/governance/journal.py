"""The request log: the request behind each cached answer, kept so governance can act on it later.

A response key is a digest: it says nothing about the request it answers, and a stored answer does not
contain the question. Two governance actions need the question back:

- refreshing an entry after a model-version change recomputes the *request* under the new revision;
- `mark_bad` by response key finds the bad entry's semantic neighbours from its last user turn.

So, for each answer written through `Governance.store` (or registered with `RequestLog.remember`), the log
keeps one record in the *same store* as the answer, under ``request:<response key>``:

- the same tenant, user, model and expiry as the answer, and the answer's tags plus `REQUEST_TAG`: erasure
  of a tenant or user (``purge``), ``invalidate_model`` and ``invalidate_tag`` remove the question with its
  answer; an `EncryptedStore` encrypts it like the answer (the question is user data too);
- the value is compact JSON ``{"request": {...}, "endpoint": "chat.completions"}``.

Costs, stated: each logged answer takes a second record (counted by ``cachelm stats``, listed by
``cachelm export`` under the tag ``cachelm:request``). The proxy logs every answer it stores (unless
``cachelm serve --no-request-log``). Answers written without the log
can still be invalidated, but not refreshed, and `mark_bad` by key finds their neighbours only through
the index (see `cachelm.governance.vectors`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachelm.errors import ConfigError
from cachelm.response.exact import ENDPOINTS
from cachelm.store.base import Record, Store

REQUEST_TAG = "cachelm:request"
KEY_PREFIX = "request:"


@dataclass(frozen=True, kw_only=True, slots=True)
class LoggedRequest:
    """The request behind one answer, with the answer's metadata."""

    response_key: str
    request: dict[str, Any]
    endpoint: str
    tenant: str
    user: str
    tags: frozenset[str]  # the answer's tags (without `REQUEST_TAG`)
    model: str
    created: float
    expires: float | None


def log_key(response_key: str) -> str:
    """The store key of the log record for `response_key`."""
    return KEY_PREFIX + response_key


def is_log_key(key: str) -> bool:
    """True for a log record's key (never a response key: those are 64 hex characters)."""
    return key.startswith(KEY_PREFIX)


class RequestLog:
    """Requests of cached answers, in a `Store` (normally the exact cache's own). Thread-safe if it is.

    Reads are administrative and raise `BackendError` on a store failure; a record that does not decode
    (written by something else) reads as absent.
    """

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"`store` must be a cachelm Store, got {type(store).__name__}")
        self.store = store

    def remember(self, request: Mapping[str, Any], answer: Record, *, endpoint: str) -> None:
        """Log `request` as the question behind the stored `answer` (mirroring its metadata)."""
        if not isinstance(request, Mapping):
            raise ConfigError(f"`request` must be a mapping, got {type(request).__name__}")
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"`endpoint` must be one of {ENDPOINTS}, got {endpoint!r}")
        try:
            value = json.dumps(
                {"request": request, "endpoint": endpoint}, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"`request` must be JSON-serialisable: {exc}") from None
        self.store.put(
            Record(
                key=log_key(answer.key),
                value=value,
                tenant=answer.tenant,
                user=answer.user,
                tags=answer.tags | {REQUEST_TAG},
                model=answer.model,
                created=answer.created,
                expires=answer.expires,
            )
        )

    def get(self, response_key: str, *, tenant: str) -> LoggedRequest | None:
        """The logged request of `response_key` if it belongs to `tenant`, else None."""
        record = self.store.peek(log_key(response_key))
        if record is None or record.tenant != tenant:
            return None  # another tenant's key reads as unknown: no cross-tenant probing
        return decode(record)

    def delete(self, response_key: str) -> bool:
        """Forget the request of `response_key`; True if one was logged."""
        return self.store.delete(log_key(response_key))


def decode(record: Record) -> LoggedRequest | None:
    """The `LoggedRequest` a log record holds, or None when it is not one of ours."""
    if not is_log_key(record.key):
        return None
    try:
        body = json.loads(record.value)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
        return None
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        return None
    return LoggedRequest(
        response_key=record.key[len(KEY_PREFIX) :],
        request=body["request"],
        endpoint=str(endpoint),
        tenant=record.tenant,
        user=record.user,
        tags=record.tags - {REQUEST_TAG},
        model=record.model,
        created=record.created,
        expires=record.expires,
    )
