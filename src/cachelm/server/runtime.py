"""Assembles one proxy process from a `ServerConfig`: stores, L1, cache, upstream, shared mode, metrics.

Embedded default: SQLite records behind an in-process L1, in-process single-flight, the local engine as
upstream. Shared mode (``redis_url``): Redis records behind the L1, the L1 kept coherent by pub/sub, and
cross-replica single-flight on Redis locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from cachelm.errors import BackendError, ConfigError
from cachelm.governance.journal import RequestLog
from cachelm.metrics import CacheMetrics
from cachelm.policy.lru import LRUPolicy
from cachelm.response.exact import ExactCache
from cachelm.server.config import LOCAL_UPSTREAM, ServerConfig
from cachelm.server.observability import AccessLog, ServerMetrics
from cachelm.server.proxy import Proxy
from cachelm.server.revisions import Revisions
from cachelm.server.semantic_layer import SemanticLayer, SemanticSettings
from cachelm.server.shared import Invalidator, RedisLocks, SharedConfig, connect
from cachelm.server.tenants import TenantRegistry
from cachelm.server.upstream import Upstream, UpstreamError, http_upstream
from cachelm.store.base import Match, Store
from cachelm.store.bounded import BoundedStore
from cachelm.store.memory import MemoryStore
from cachelm.store.tiered import TieredStore
from cachelm.store.url import open_store, sqlite_file

if TYPE_CHECKING:
    from cachelm.crypto import Keyring

log = logging.getLogger("cachelm.server")


def _keyring(config: ServerConfig) -> Keyring | None:
    """The at-rest keyring (`--keyring` / CACHELM_KEYRING), or None."""
    if not config.keyring:
        return None
    from cachelm.crypto import Keyring

    return Keyring.parse(config.keyring)


def _open_records(config: ServerConfig) -> Store:
    keyring = _keyring(config)
    if config.redis_url is not None:
        # Short timeouts: the store is read on the event loop, so a hung Redis must cost a fraction of a
        # second per request, not the client default (a `?socket_timeout=` in the URL still wins).
        return open_store(
            config.redis_url,
            namespace=config.namespace,
            keyring=keyring,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
    return open_store(config.store_url, keyring=keyring)


def _with_l1(l2: Store, entries: int) -> tuple[Store, TieredStore | None]:
    """`l2` behind a bounded in-process LRU tier; (store, tiered). Without L1 when `entries` is 0."""
    if entries == 0:
        return l2, None
    tiered = TieredStore(BoundedStore(MemoryStore(), LRUPolicy(max_entries=entries)), l2)
    return tiered, tiered


def _local_upstream(config: ServerConfig) -> Upstream:
    try:
        from cachelm.server.local import LocalEngineUpstream
    except ImportError as exc:  # torch / transformers are the `engine` extra
        raise ConfigError(
            f"the local engine upstream needs the `engine` extra ({exc}); install `cachelm[engine]` "
            "or start with `--upstream URL` to proxy an OpenAI-compatible endpoint"
        ) from exc
    return LocalEngineUpstream.load(config.local_model, key_secret=config.key_secret)


def _semantic_layer(config: ServerConfig, store: Store) -> SemanticLayer:
    # The index persists beside a SQLite store's file.
    index_path = sqlite_file(config.store_url) if config.redis_url is None else None
    settings = SemanticSettings(
        embedder=config.semantic_embedder,
        checkpoint=config.semantic_checkpoint,
        delta=config.semantic_delta,
        threshold=config.semantic_threshold,
        pg_url=config.pg_url,
        index_path=index_path,
        table=f"{config.namespace}_semantic".replace("-", "_"),
    )
    # The persisted index is sealed with the stores' keyring (question vectors are user data).
    keyring = _keyring(config) if index_path is not None else None
    return SemanticLayer(settings, store, tenant_secret=config.key_secret, keyring=keyring)


class Runtime:
    """The live components of one proxy process."""

    def __init__(
        self,
        config: ServerConfig,
        registry: TenantRegistry,
        *,
        upstream: Upstream | None = None,
        semantic: SemanticLayer | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.origin = uuid.uuid4().hex[:12]
        self.records = _open_records(config)
        self.store, self.tiered = _with_l1(self.records, config.l1_entries)
        self.cache = ExactCache(
            self.store,
            default_ttl=config.default_ttl,
            metrics=CacheMetrics(),
            key_secret=config.key_secret,
            model_revisions=dict(config.model_revisions),
        )
        self.metrics = ServerMetrics(self.cache.metrics)
        self.access_log = AccessLog() if config.access_log else None
        if upstream is None:
            upstream = (
                _local_upstream(config)
                if config.upstream == LOCAL_UPSTREAM
                else http_upstream(
                    config.upstream, api_key=config.upstream_api_key, read_timeout=config.upstream_timeout_s
                )
            )
        self.upstream = upstream
        self.redis: Any = None
        self.locks: RedisLocks | None = None
        self.invalidator: Invalidator | None = None
        if config.redis_url is not None:
            shared = SharedConfig(
                redis_url=config.redis_url, namespace=config.namespace, lease_ms=config.lease_ms
            )
            self.redis = connect(shared)
            self.locks = RedisLocks(self.redis, shared)
            self.invalidator = Invalidator(self.redis, shared, drop=self._drop_local, reset=self._reset_local)
        self.semantic = semantic
        if semantic is None and config.semantic:
            self.semantic = _semantic_layer(config, self.store)
        if self.semantic is not None:  # a model's revision keys its semantic entries as its answers
            self.semantic.use_revisions(self.cache.model_revisions)
        self.proxy = Proxy(
            cache=self.cache,
            upstream=self.upstream,
            metrics=self.metrics,
            hit_floor_ms=config.hit_floor_ms,
            semantic=self.semantic,
            locks=self.locks,
            invalidator=self.invalidator,
            origin=self.origin,
            stream_usage=config.stream_usage,
            request_log=RequestLog(self.store) if config.request_log else None,
        )
        self.revisions = Revisions(self)
        self._reload: asyncio.Future[None] | None = None  # revisions re-read after a reconnect
        self.embeddings: Any = None
        self._models: tuple[float, dict[str, Any]] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.revisions.load()  # shared mode: the revisions other replicas switched to
        if self.invalidator is not None:
            self.invalidator.start()
        log.info(
            "started",
            extra={
                "origin": self.origin,
                "upstream": self.upstream.name,
                "store": self.records.url,
                "shared": self.redis is not None,
            },
        )

    async def aclose(self) -> None:
        self.revisions.cancel()
        if self.access_log is not None:
            self.access_log.flush()
        if self.invalidator is not None:
            await self.invalidator.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.upstream.aclose()
        if self.semantic is not None:
            self.semantic.close()
        self.store.close()

    # -- L1 coherence ----------------------------------------------------------------------------------

    def _drop_local(self, message: dict[str, object]) -> None:
        if self.revisions.receive(message):
            return
        tiered = self.tiered
        if tiered is None or message.get("origin") == self.origin:
            return  # our own writes already updated our L1
        key, tenant, user = message.get("key"), message.get("tenant"), message.get("user")
        if isinstance(key, str):
            tiered.invalidate_local(key)
        elif isinstance(tenant, str) and not message.get("all"):
            tiered.purge_local(Match(tenant=tenant, user=user if isinstance(user, str) else None))
        else:
            tiered.clear_local()

    def _reset_local(self) -> None:
        if self.tiered is not None:
            self.tiered.clear_local()
        # Revision switches announced while this replica was away are in the Redis hash.
        self._reload = asyncio.ensure_future(self.revisions.load())

    async def invalidate(
        self, *, tenant: str | None = None, user: str | None = None, all: bool = False
    ) -> None:
        """Tell the other replicas to drop what a purge just deleted from the shared store."""
        if self.invalidator is not None:
            message: dict[str, object] = {"origin": self.origin}
            if all or tenant is None:
                message["all"] = True
            else:
                message.update(tenant=tenant, user=user)
            await self.invalidator.publish(message)

    # -- status ----------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"status": "ok", "upstream": self.upstream.name, "origin": self.origin}
        try:
            await asyncio.to_thread(self.records.peek, "0" * 64)
            report["store"] = "ok"
        except BackendError as exc:
            report["store"], report["status"] = f"error: {exc}", "degraded"
        if self.redis is not None:
            try:
                await self.redis.ping()
                report["redis"] = "ok"
            except Exception as exc:  # any client error means "not reachable now"
                report["redis"], report["status"] = f"error: {type(exc).__name__}", "degraded"
            report["invalidation"] = (
                "subscribed" if self.invalidator and self.invalidator.connected.is_set() else "down"
            )
        return report

    async def models(self) -> dict[str, Any]:
        """The upstream's model list, remembered for a minute. A failing upstream raises `UpstreamError`
        and is not remembered: an empty list would hide the failure, and keep hiding it after a recovery."""
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < 60:
            return self._models[1]
        getter = getattr(self.upstream, "get", None)
        if getter is not None:
            _, body = await getter("models")  # an error status raises, with its retry headers
            try:
                listing: dict[str, Any] = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise UpstreamError("upstream answered with invalid JSON") from None
        else:
            listing = await self.upstream.models()  # type: ignore[attr-defined]
        self._models = (now, listing)
        return listing
