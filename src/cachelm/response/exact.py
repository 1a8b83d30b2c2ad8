"""The exact response cache: a request's canonical key → the JSON answer it got.

`ExactCache` works on any `Store`. A value is the upstream response (an OpenAI-shaped dict) encoded as
compact UTF-8 JSON; the record's metadata (tenant, user, tags, model, created, expires) is what
invalidation and erasure filter on.

Serving rules:

- Sampled requests (``keys.is_sampled``: temperature > 0 or absent) are neither served nor stored unless
  the caller passes ``allow_sampled=True``: their answer is one draw among many.
- Only successful, complete answers are stored (`cacheable_response`): no ``error`` body, and for
  completions every choice carries a ``finish_reason``.
- On the serving path (`lookup`, `store`, `get_or_compute`) a failing store (`BackendError`) or a corrupt
  value becomes a miss plus an ``errors`` counter, never a failed request. Administrative calls
  (invalidation, erasure, export/import) raise, because their caller must know they did not happen.
- Concurrent identical misses compute once (in-process single-flight); a failing computation is not
  stored and its exception reaches every caller that waited for it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import orjson

from cachelm.clock import Clock
from cachelm.errors import BackendError, ConfigError
from cachelm.keys import is_sampled, request_key, tenant_salt
from cachelm.metrics import CacheMetrics
from cachelm.response.singleflight import AsyncSingleFlight, SingleFlight
from cachelm.store.base import DEFAULT_TENANT, Match, Record, Store, check_ttl

LAYER = "exact"
ENDPOINTS = ("chat.completions", "completions", "embeddings")  # OpenAI endpoints with a known answer shape

Response = dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class CachedResponse:
    """A served cache entry. `hits` counts the times it was served, this lookup included."""

    key: str
    response: Response
    created: float  # wall-clock seconds
    hits: int
    tenant: str = DEFAULT_TENANT
    model: str = ""
    tags: frozenset[str] = frozenset()
    expires: float | None = None

    def age(self, now: float) -> float:
        """Seconds since the entry was stored (0 when `now` is earlier, e.g. clock skew across replicas)."""
        return max(0.0, now - self.created)


# Finish reasons of an answer that is not whole: still running (None), failed, or with content the
# provider's filter omitted (a retry may get the whole answer; a cached one would repeat the omission).
INCOMPLETE = (None, "error", "content_filter")


def cacheable_response(response: Any, endpoint: str) -> bool:
    """True when `response` is a successful, complete answer of `endpoint` worth storing."""
    if not isinstance(response, Mapping) or response.get("error") is not None:
        return False
    if endpoint in ("chat.completions", "completions"):
        choices = response.get("choices")
        return (
            isinstance(choices, list)
            and bool(choices)
            and all(isinstance(c, Mapping) and c.get("finish_reason") not in INCOMPLETE for c in choices)
        )
    if endpoint == "embeddings":
        data = response.get("data")
        return isinstance(data, list) and bool(data)
    return True


def encode_response(response: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; raises ConfigError for values JSON cannot hold exactly (NaN, objects)."""
    try:
        return json.dumps(response, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"`response` must be JSON-serialisable: {exc}") from None


def _check_str(value: Any, name: str, *, empty: bool = False) -> None:
    if not isinstance(value, str) or (not empty and not value):
        raise ConfigError(f"`{name}` must be a {'' if empty else 'non-empty '}string, got {value!r}")


class ExactCache:
    """Exact-match response cache over a `Store`. Thread-safe when the store is.

    `clock` stamps ``created``/``expires`` (default: the store's own clock, which decides expiry);
    `key_secret` salts every tenant's keys; `model_revisions` maps a model id to its revision, which is part
    of the key, so a new revision never serves an answer of the old one.
    """

    def __init__(
        self,
        store: Store,
        *,
        default_ttl: float | None = None,
        clock: Clock | None = None,
        metrics: CacheMetrics | None = None,
        key_secret: bytes = b"",
        model_revisions: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"`store` must be a cachelm Store, got {type(store).__name__}")
        check_ttl(default_ttl, "default_ttl")
        if not isinstance(key_secret, bytes):
            raise ConfigError(f"`key_secret` must be bytes, got {type(key_secret).__name__}")
        self.backend = store  # not `store`: that name is the write method
        self.default_ttl = default_ttl
        # Records are stamped with this clock and expired by the store's: one clock for both by default.
        self.clock: Clock = store.clock if clock is None else clock
        self.metrics = metrics if metrics is not None else CacheMetrics()
        self.key_secret = key_secret
        self.model_revisions: dict[str, str] = dict(model_revisions or {})
        self._salts: dict[str, bytes] = {}
        self._flights: SingleFlight[tuple[Response, bool]] = SingleFlight()
        self._aflights: AsyncSingleFlight[tuple[Response, bool]] = AsyncSingleFlight()

    # -- keys ------------------------------------------------------------------------------------------

    def key_for(
        self, request: Mapping[str, Any], *, tenant: str = DEFAULT_TENANT, endpoint: str = "chat.completions"
    ) -> str:
        """The response key of `request` for `tenant` and `endpoint` (includes the model's revision)."""
        _check_str(tenant, "tenant")
        _check_str(endpoint, "endpoint")
        salt = self._salts.get(tenant)
        if salt is None:
            salt = self._salts[tenant] = tenant_salt(tenant, self.key_secret)
        model = request.get("model", "") if isinstance(request, Mapping) else ""
        revision = self.model_revisions.get(model, "") if isinstance(model, str) else ""
        return request_key(request, tenant_salt=salt, endpoint=endpoint, model_revision=revision)

    def set_model_revision(self, model: str, revision: str, *, purge: bool = True) -> int:
        """Record a new revision of `model`: later keys differ; old entries are purged unless told not to."""
        _check_str(model, "model")
        _check_str(revision, "revision", empty=True)
        self.model_revisions[model] = revision
        return self.invalidate_model(model) if purge else 0

    # -- serving path ----------------------------------------------------------------------------------

    def eligible(self, request: Mapping[str, Any], *, allow_sampled: bool = False) -> bool:
        """True when `request` may be served from and stored in the cache; a False is counted as a bypass."""
        if not isinstance(request, Mapping):
            raise ConfigError(f"`request` must be a mapping, got {type(request).__name__}")
        temperature = request.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, int | float)
        ):
            raise ConfigError(f"`request.temperature` must be a number, got {temperature!r}")
        if allow_sampled or not is_sampled(request):
            return True
        self.metrics.bypass(LAYER, "sampled")
        return False

    def lookup(
        self,
        request: Mapping[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
        endpoint: str = "chat.completions",
        allow_sampled: bool = False,
    ) -> CachedResponse | None:
        """The cached answer to `request`, or None (miss, not eligible, or the store failed)."""
        if not self.eligible(request, allow_sampled=allow_sampled):
            return None
        return self._lookup_key(self.key_for(request, tenant=tenant, endpoint=endpoint), tenant)

    def _lookup_key(self, key: str, tenant: str) -> CachedResponse | None:
        start = time.perf_counter()
        try:
            record = self.backend.get(key)
        except BackendError:
            record = None
            self.metrics.error(LAYER, "backend")
        hit = None if record is None else self._decode(record)
        self.metrics.observe_lookup(LAYER, time.perf_counter() - start)
        if hit is None:
            self.metrics.miss(LAYER, tenant=tenant)
        else:
            self.metrics.hit(LAYER, tenant=tenant, model=hit.model, usage=hit.response.get("usage"))
        return hit

    def _decode(self, record: Record) -> CachedResponse | None:
        try:
            response = orjson.loads(record.value)  # ~4x faster than json.loads on the hit path
            if not isinstance(response, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            # Bytes that passed the store's checksum but are not our JSON: written by something else or
            # by an incompatible version. Drop it so the next request recomputes.
            self.metrics.error(LAYER, "decode")
            self._forget(record.key)
            return None
        return CachedResponse(
            key=record.key,
            response=response,
            created=record.created,
            hits=record.hits + 1,
            tenant=record.tenant,
            model=record.model,
            tags=record.tags,
            expires=record.expires,
        )

    def _forget(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except BackendError:
            self.metrics.error(LAYER, "backend")

    def store(
        self,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        tags: Iterable[str] = (),
        ttl: float | None = None,
        endpoint: str = "chat.completions",
        allow_sampled: bool = False,
    ) -> str | None:
        """Store `response` as the answer to `request`; returns its key, or None when it was not stored
        (a sampled request without `allow_sampled`, an error or incomplete answer, or a store failure)."""
        check_ttl(ttl)
        if not self.eligible(request, allow_sampled=allow_sampled):
            return None
        key = self.key_for(request, tenant=tenant, endpoint=endpoint)
        return self._store_key(key, request, response, tenant, user, tags, ttl, endpoint)

    def _store_key(
        self,
        key: str,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        tenant: str,
        user: str,
        tags: Iterable[str],
        ttl: float | None,
        endpoint: str,
    ) -> str | None:
        if not cacheable_response(response, endpoint):
            self.metrics.bypass(LAYER, "uncacheable_response")
            return None
        record = self.make_record(key, request, response, tenant=tenant, user=user, tags=tags, ttl=ttl)
        try:
            self.backend.put(record)
        except BackendError:
            self.metrics.error(LAYER, "backend")
            return None
        self.metrics.bytes_written(LAYER, record.size)
        return key

    def make_record(
        self,
        key: str,
        request: Mapping[str, Any],
        response: Mapping[str, Any],
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        tags: Iterable[str] = (),
        ttl: float | None = None,
        created: float | None = None,
    ) -> Record:
        """The record `store` would write (also used by import and by the proxy's own write path)."""
        _check_str(user, "user", empty=True)
        if isinstance(tags, str):
            raise ConfigError(f"`tags` must be an iterable of strings, not a string: {tags!r}")
        tag_set = frozenset(tags)
        for tag in tag_set:
            _check_str(tag, "tags[]")
        now = self.clock() if created is None else created
        ttl = self.default_ttl if ttl is None else ttl
        model = request.get("model", "")
        return Record(
            key=key,
            value=encode_response(response),
            tenant=tenant,
            user=user,
            tags=tag_set,
            model=model if isinstance(model, str) else "",
            created=now,
            expires=None if ttl is None else now + ttl,
        )

    def get_or_compute(
        self,
        request: Mapping[str, Any],
        compute: Callable[[], Mapping[str, Any]],
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        tags: Iterable[str] = (),
        ttl: float | None = None,
        endpoint: str = "chat.completions",
        allow_sampled: bool = False,
    ) -> tuple[Response, bool]:
        """The cached answer to `request`, or `compute()`'s answer (then stored). Returns
        ``(response, hit)``; `hit` is False only for the caller whose own `compute` ran (a caller served
        by a concurrent identical computation gets True and counts as ``coalesced``)."""
        key, cached = self._before_compute(request, ttl, tenant, endpoint, allow_sampled)
        if key is None:
            return dict(compute()), False
        if cached is not None:
            return cached, True

        def flight() -> tuple[Response, bool]:
            landed = self._recheck(key)
            if landed is not None:
                return landed, True
            start = time.perf_counter()
            response = dict(compute())
            return self._after_compute(key, start, request, response, tenant, user, tags, ttl, endpoint)

        return self._landed(*self._flights.do(key, flight))

    async def aget_or_compute(
        self,
        request: Mapping[str, Any],
        acompute: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        tenant: str = DEFAULT_TENANT,
        user: str = "",
        tags: Iterable[str] = (),
        ttl: float | None = None,
        endpoint: str = "chat.completions",
        allow_sampled: bool = False,
    ) -> tuple[Response, bool]:
        """`get_or_compute` for coroutines: `acompute()` is awaited once per key across concurrent tasks.

        The store is called synchronously from the event loop: memory and SQLite reads take microseconds;
        a network store's latency is the price of one round trip per request either way.
        """
        key, cached = self._before_compute(request, ttl, tenant, endpoint, allow_sampled)
        if key is None:
            return dict(await acompute()), False
        if cached is not None:
            return cached, True

        async def flight() -> tuple[Response, bool]:
            landed = self._recheck(key)
            if landed is not None:
                return landed, True
            start = time.perf_counter()
            response = dict(await acompute())
            return self._after_compute(key, start, request, response, tenant, user, tags, ttl, endpoint)

        return self._landed(*await self._aflights.do(key, flight))

    def _before_compute(
        self, request: Mapping[str, Any], ttl: float | None, tenant: str, endpoint: str, allow_sampled: bool
    ) -> tuple[str | None, Response | None]:
        """Shared start of (a)get_or_compute: ``(None, None)`` when the request is not cacheable, else its
        key and the cached answer (None on a miss)."""
        check_ttl(ttl)
        if not self.eligible(request, allow_sampled=allow_sampled):
            return None, None
        key = self.key_for(request, tenant=tenant, endpoint=endpoint)
        cached = self._lookup_key(key, tenant)
        return key, None if cached is None else cached.response

    def _after_compute(
        self,
        key: str,
        start: float,
        request: Mapping[str, Any],
        response: Response,
        tenant: str,
        user: str,
        tags: Iterable[str],
        ttl: float | None,
        endpoint: str,
    ) -> tuple[Response, bool]:
        self.metrics.observe_compute(LAYER, time.perf_counter() - start)
        self._store_key(key, request, response, tenant, user, tags, ttl, endpoint)
        return response, False

    def _recheck(self, key: str) -> Response | None:
        """A second read inside the flight: a flight that landed between our miss and our start has
        stored the answer already, so computing again would waste an upstream call."""
        try:
            record = self.backend.get(key)
        except BackendError:
            self.metrics.error(LAYER, "backend")
            return None
        cached = None if record is None else self._decode(record)
        return None if cached is None else cached.response

    def _landed(self, outcome: tuple[Response, bool], shared: bool) -> tuple[Response, bool]:
        response, hit = outcome
        if not shared:
            return response, hit
        self.metrics.coalesced(LAYER)
        # Followers get their own copy: callers may mutate the dict they are handed.
        return copy.deepcopy(response), True

    def measure(self) -> tuple[int, int]:
        """Count the live entries and their value bytes (one full scan: O(entries)), record them in the
        ``entries`` / ``bytes_stored`` gauges, and return ``(entries, bytes)``. Raises on a store failure."""
        entries = num_bytes = 0
        for record in self.backend.scan():
            entries += 1
            num_bytes += record.size
        self.metrics.set_size(LAYER, entries=entries, num_bytes=num_bytes)
        return entries, num_bytes

    # -- invalidation and erasure (administrative: errors raise) ---------------------------------------

    def invalidate(self, key: str) -> bool:
        """Delete the entry under `key`; True if there was one."""
        _check_str(key, "key")
        return self.backend.delete(key)

    def invalidate_tag(self, tag: str, tenant: str | None = None) -> int:
        """Delete every entry tagged `tag` (of one tenant, or of all); returns how many."""
        _check_str(tag, "tag")
        return self.backend.purge(Match(tag=tag, tenant=tenant))

    def invalidate_model(self, model: str, tenant: str | None = None) -> int:
        """Delete every entry answered by `model` (after a model version change); returns how many."""
        _check_str(model, "model")
        return self.backend.purge(Match(model=model, tenant=tenant))

    def purge(
        self,
        *,
        tenant: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        model: str | None = None,
        older_than: float | None = None,
    ) -> int:
        """Delete every entry matching all given filters (`older_than`: seconds of age); returns how many."""
        return self.backend.purge(
            self.purge_match(tenant=tenant, user=user, tag=tag, model=model, older_than=older_than)
        )

    def purge_match(
        self,
        *,
        tenant: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        model: str | None = None,
        older_than: float | None = None,
    ) -> Match:
        """The validated filter `purge` deletes with (callers that must know the keys first scan with it)."""
        if older_than is not None and (
            isinstance(older_than, bool) or not isinstance(older_than, int | float) or older_than < 0
        ):
            raise ConfigError(f"`older_than` must be a number of seconds >= 0, got {older_than!r}")
        for name, value in (("tenant", tenant), ("user", user), ("tag", tag), ("model", model)):
            if value is not None:
                _check_str(value, name, empty=name == "user")
        where = Match(
            tenant=tenant,
            user=user,
            tag=tag,
            model=model,
            created_before=None if older_than is None else self.clock() - older_than,
        )
        if where.empty:
            raise ConfigError("`purge` needs at least one filter (tenant, user, tag, model, older_than)")
        return where

    def erase_user(self, tenant: str, user: str) -> int:
        """Delete every entry stored for `user` of `tenant` (right to erasure); returns how many."""
        _check_str(tenant, "tenant")
        _check_str(user, "user")
        return self.backend.purge(Match(tenant=tenant, user=user))

    def erase_tenant(self, tenant: str) -> int:
        """Delete every entry of `tenant`; returns how many."""
        _check_str(tenant, "tenant")
        return self.backend.purge(Match(tenant=tenant))

    # -- export / import -------------------------------------------------------------------------------

    def export_jsonl(self, fp: IO[str], where: Match | None = None) -> int:
        """Write every live entry matching `where` to `fp`, one JSON record per line; returns how many."""
        from cachelm.response.jsonl import export_jsonl

        return export_jsonl(self, fp, where)

    def import_jsonl(self, fp: IO[str]) -> int:
        """Read entries written by `export_jsonl` (or request/response seed lines) into the store.

        Every line is validated first; a bad line raises ConfigError (``line N: reason``) and nothing is
        written. Returns how many entries were stored.
        """
        from cachelm.response.jsonl import import_jsonl

        return import_jsonl(self, fp)
