"""`memoize`: cache the results of tool calls and other deterministic functions in a cachelm store.

    @memoize(open_store("sqlite:///tools.db"), ttl=3600)
    def weather(city: str, *, unit: str = "C") -> dict[str, float]: ...

Contract:

- The key is SHA-256 over the namespace (default: the function's module and qualified name) and a
  canonical encoding of the arguments *bound to the signature*, defaults applied: ``weather("Oslo")`` and
  ``weather(city="Oslo", unit="C")`` share one entry. Encodable arguments: None, bool, int, finite float,
  str, bytes, and lists, tuples, dicts, sets of those (a list and a tuple encode differently). Anything
  else raises `ConfigError` at call time; pass ``key=`` (a function of the same arguments returning an
  encodable value) to key such calls, and for methods, whose ``self`` is not encodable.
- Results are stored as JSON, so they must be JSON values that read back equal (no tuples, no int dict
  keys); otherwise the call raises `ConfigError` after computing, naming the function.
- Exceptions are never cached. Concurrent identical calls compute once (single-flight); each caller
  gets its own copy of the result, so one that mutates it changes no other caller's.
- A failing store is a miss plus an ``errors`` counter (when given an `ExactCache`, its metrics under
  ``layer="tool"``): the function still runs and its result is returned.
- Sync and async (``async def``) functions are both supported.

The wrapper exposes ``cache_key(*args, **kwargs)``, ``invalidate(*args, **kwargs)`` and ``cache_clear()``;
on a method, ``obj.method.cache_key(x)`` and ``obj.method.invalidate(x)`` pass ``obj`` as ``self`` as a
call does.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import inspect
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast

from cachelm.errors import BackendError, ConfigError
from cachelm.metrics import CacheMetrics
from cachelm.response.exact import ExactCache
from cachelm.response.singleflight import AsyncSingleFlight, SingleFlight
from cachelm.store.base import Match, Record, Store, check_ttl

P = ParamSpec("P")
R = TypeVar("R")

LAYER = "tool"
TAG_PREFIX = "memoize:"


def encode_argument(value: Any, path: str) -> Any:
    """A JSON value standing for `value`; containers are tagged so a list and a tuple differ."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"argument `{path}` must be a finite number, got {value!r}")
        return value
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    if isinstance(value, list | tuple):
        tag = "l" if isinstance(value, list) else "t"
        return {tag: [encode_argument(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, set | frozenset):
        items = [encode_argument(v, f"{path}{{}}") for v in value]
        return {"s": sorted(items, key=_sort_key)}
    if isinstance(value, dict):
        pairs = [
            [encode_argument(k, f"{path} key"), encode_argument(v, f"{path}[{k!r}]")]
            for k, v in value.items()
        ]
        return {"d": sorted(pairs, key=lambda kv: _sort_key(kv[0]))}
    raise ConfigError(
        f"argument `{path}` has type {type(value).__name__}, which memoize cannot encode as a key; "
        "pass `key=` to build the key from the arguments yourself"
    )


def _sort_key(encoded: Any) -> str:
    return json.dumps(encoded, sort_keys=True, separators=(",", ":"))


class Memoized(Generic[P, R]):
    """A memoized function. Call it like the original; see the module docstring for the contract."""

    def __init__(
        self,
        fn: Callable[P, R],
        store: Store,
        *,
        ttl: float | None,
        namespace: str,
        key: Callable[..., Any] | None,
        metrics: CacheMetrics | None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._store = store
        self._ttl = ttl
        self._namespace = namespace
        self._key = key
        self._metrics = metrics
        self._signature = inspect.signature(fn)
        self._is_async = inspect.iscoroutinefunction(fn)
        self._flights: SingleFlight[Any] = SingleFlight()
        self._aflights: AsyncSingleFlight[Any] = AsyncSingleFlight()

    @property
    def tag(self) -> str:
        """The tag every entry of this function carries (``memoize:<namespace>``)."""
        return TAG_PREFIX + self._namespace

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # Decorating a method: bind like a function would, so `obj.method(x)` passes `obj` as `self`.
        return self if instance is None else BoundMemoized(self, instance)

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The store key of a call with these arguments."""
        if self._key is not None:
            material = encode_argument(self._key(*args, **kwargs), "key()")
        else:
            try:
                bound = self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise ConfigError(f"`{self._namespace}`: {exc}") from None
            bound.apply_defaults()
            material = {name: encode_argument(v, name) for name, v in bound.arguments.items()}
        digest = hashlib.sha256(b"cachelm.memoize\x00" + self._namespace.encode() + b"\x00")
        digest.update(_sort_key(material).encode())
        return digest.hexdigest()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self.cache_key(*args, **kwargs)
        if self._is_async:
            return cast(R, self._acall(key, args, kwargs))
        found, value = self._read(key)
        if found:
            return cast(R, value)

        def compute() -> Any:
            landed, value = self._read(key, count=False)
            if landed:
                return value
            result = self._fn(*args, **kwargs)
            self._write(key, result)
            return result

        return cast(R, _own(*self._flights.do(key, compute)))

    async def _acall(self, key: str, args: Any, kwargs: Any) -> Any:
        found, value = self._read(key)
        if found:
            return value

        async def compute() -> Any:
            landed, value = self._read(key, count=False)
            if landed:
                return value
            result = await cast(Callable[..., Awaitable[Any]], self._fn)(*args, **kwargs)
            self._write(key, result)
            return result

        return _own(*await self._aflights.do(key, compute))

    def _read(self, key: str, *, count: bool = True) -> tuple[bool, Any]:
        """``(found, value)``. Inside a flight `count` is False: the read that let the caller in counted
        its miss, and this second one only catches a flight that landed between that miss and this one."""
        try:
            record = self._store.get(key)
        except BackendError:
            self._count("error")
            return False, None
        if record is not None:
            try:
                value = json.loads(record.value)
            except ValueError:
                self._count("error")
                self._forget(key)
            else:
                if count:
                    self._count("hit")
                return True, value
        if count:
            self._count("miss")
        return False, None

    def _forget(self, key: str) -> None:
        try:
            self._store.delete(key)
        except BackendError:
            self._count("error")

    def _write(self, key: str, result: Any) -> None:
        try:
            value = json.dumps(result, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            roundtrip_ok = json.loads(value) == result
        except (TypeError, ValueError):
            roundtrip_ok = False
        if not roundtrip_ok:
            raise ConfigError(
                f"`{self._namespace}` returned a {type(result).__name__} that JSON cannot hold exactly "
                "(memoized results must be JSON values: no tuples, sets, objects or non-string keys)"
            )
        now = self._store.clock()
        record = Record(
            key=key,
            value=value.encode(),
            tags=frozenset({self.tag}),
            created=now,
            expires=None if self._ttl is None else now + self._ttl,
        )
        try:
            self._store.put(record)
        except BackendError:
            self._count("error")

    def _count(self, event: str) -> None:
        if self._metrics is None:
            return
        if event == "hit":
            self._metrics.hit(LAYER)
        elif event == "miss":
            self._metrics.miss(LAYER)
        else:
            self._metrics.error(LAYER, "backend")

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget the cached result of a call with these arguments; True if there was one."""
        return self._store.delete(self.cache_key(*args, **kwargs))

    def cache_clear(self) -> int:
        """Forget every cached result of this function; returns how many."""
        return self._store.purge(Match(tag=self.tag))


def _own(value: Any, shared: bool) -> Any:
    # A follower of a flight gets its own copy: a caller may mutate what it is handed (a hit is a fresh
    # decode each time, and the leader keeps the object its function returned).
    return copy.deepcopy(value) if shared else value


class BoundMemoized(Generic[R]):
    """A memoized method bound to an instance: calls, `cache_key` and `invalidate` all pass it first."""

    def __init__(self, memoized: Memoized[..., R], instance: object) -> None:
        functools.update_wrapper(self, memoized, updated=())  # not its __dict__: that is its state
        self._memoized = memoized
        self._instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self._memoized(self._instance, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        """The store key of a call with these arguments on this instance."""
        return self._memoized.cache_key(self._instance, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forget the cached result of a call with these arguments on this instance; True if there was one."""
        return self._memoized.invalidate(self._instance, *args, **kwargs)

    def cache_clear(self) -> int:
        """Forget every cached result of the method, for every instance; returns how many."""
        return self._memoized.cache_clear()

    @property
    def tag(self) -> str:
        return self._memoized.tag


def memoize(
    store_or_cache: Store | ExactCache,
    *,
    ttl: float | None = None,
    namespace: str | None = None,
    key: Callable[..., Any] | None = None,
) -> Callable[[Callable[P, R]], Memoized[P, R]]:
    """Decorate a sync or async function so its results are cached in `store_or_cache`.

    `ttl` (seconds) defaults to the cache's ``default_ttl`` when an `ExactCache` is given, else no expiry.
    """
    if isinstance(store_or_cache, ExactCache):
        store, metrics = store_or_cache.backend, store_or_cache.metrics
        ttl = store_or_cache.default_ttl if ttl is None else ttl
    elif isinstance(store_or_cache, Store):
        store, metrics = store_or_cache, None
    else:
        raise ConfigError(
            f"`store_or_cache` must be a Store or an ExactCache, got {type(store_or_cache).__name__}"
        )
    check_ttl(ttl)
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ConfigError(f"`namespace` must be a non-empty string, got {namespace!r}")
    if key is not None and not callable(key):
        raise ConfigError(f"`key` must be a callable, got {key!r}")

    def decorate(fn: Callable[P, R]) -> Memoized[P, R]:
        if not callable(fn):
            raise ConfigError(f"memoize decorates a function, got {fn!r}")
        name = namespace or f"{fn.__module__}.{fn.__qualname__}"
        return Memoized(fn, store, ttl=ttl, namespace=name, key=key, metrics=metrics)

    return decorate
