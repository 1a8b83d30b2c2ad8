"""Shared mode: several proxy processes on one Redis.

Two services, both degrading to single-replica behaviour while Redis is away (never a failed request):

Cross-replica single-flight (`RedisLocks`)
    The leader of a miss takes ``SET lock:<key> <token> NX PX <lease>`` with a fencing token from ``INCR``
    (strictly increasing across replicas; both in one Lua call). While it computes, a renewer extends the
    lease only if the lock still holds its token (a Lua compare-and-extend), and the release deletes the
    lock only if it still holds its token (compare-and-delete): a holder whose lease ran out can never
    release or extend a lock that another replica took over. Before storing its answer the holder checks
    that it still holds the lock (fencing), so a replica that lost its lease never overwrites. A holder
    that dies (SIGKILL) stops renewing, so the lock expires after one lease and a waiter takes over. Waiters
    poll the shared store for the answer with a short
    back-off and try to take the lock whenever it is free; a flight that ended without an answer (upstream
    error, uncacheable answer) frees the lock and one waiter computes next.

L1 coherence (`Invalidator`)
    Every replica keeps an in-process L1 in front of Redis. A write that replaces or deletes an entry
    publishes the key (or a tenant/user purge) on one channel; every replica drops it from its L1. While
    the subscription is down, messages can be lost: on reconnecting, a replica clears its whole L1, since
    it cannot know what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cachelm.errors import BackendError, ConfigError

log = logging.getLogger("cachelm.server")

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# One round trip: draw a fencing token and take the lock with it (the token is spent even when the lock
# is taken, so tokens stay strictly increasing across every attempt of every replica).
_ACQUIRE = """
local token = redis.call('INCR', KEYS[2])
if redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[1]) then return token end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, kw_only=True)
class SharedConfig:
    """Settings of shared mode. `lease_ms` bounds how long a dead holder blocks a key."""

    redis_url: str
    namespace: str = "cachelm"
    lease_ms: int = 10_000
    wait_timeout_s: float = 120.0
    poll_initial_s: float = 0.005
    poll_max_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"`redis_url` must be a redis:// URL, got {self.redis_url!r}")
        if self.lease_ms < 100:
            raise ConfigError(f"`lease_ms` must be >= 100, got {self.lease_ms!r}")
        if self.wait_timeout_s <= 0:
            raise ConfigError(f"`wait_timeout_s` must be > 0, got {self.wait_timeout_s!r}")


def connect(config: SharedConfig) -> aioredis.Redis:
    """An asyncio Redis client with short timeouts: a dead Redis must cost milliseconds, not a hang."""
    return aioredis.Redis.from_url(
        config.redis_url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=5,
        retry_on_timeout=False,
    )


class Lease:
    """A held lock: its fencing token and the renewer keeping it alive."""

    def __init__(self, locks: RedisLocks, key: str, token: int, *, sent_at: float) -> None:
        self.locks, self.key, self.token = locks, key, token
        # When the last successful acquire/extend was *sent*: Redis started counting the lease no earlier.
        self._confirmed_at = sent_at
        self._renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        interval = self.locks.config.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            sent_at = time.monotonic()
            try:
                if not await self.locks.extend(self.key, self.token):
                    log.warning("lost lock", extra={"key": self.key[:16], "token": self.token})
                    self._confirmed_at = -math.inf
                    return
                self._confirmed_at = sent_at
            except BackendError:
                continue  # Redis blipped: keep trying until the lease would have run out anyway

    async def holds(self) -> bool:
        """True while the lock still carries this lease's token (checked before writing the answer).

        Within 90 % of a lease after the last confirmed acquire/extend the answer is known without asking:
        only an expiry can take the lock from its holder, and Redis cannot have counted more time than this
        process has since the command was sent. Later, Redis is asked.
        """
        if time.monotonic() - self._confirmed_at < 0.9 * self.locks.config.lease_ms / 1000:
            return True
        try:
            value = await self.locks.redis.get(self.locks.lock_key(self.key))
        except RedisError:
            return True  # Redis away: nobody else can have taken it over through Redis either
        return value is not None and int(value) == self.token

    async def release(self) -> None:
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        with contextlib.suppress(BackendError):
            await self.locks.release(self.key, self.token)


class RedisLocks:
    """Fenced, leased locks on Redis, one per cache key."""

    def __init__(self, redis: aioredis.Redis, config: SharedConfig) -> None:
        self.redis = redis
        self.config = config
        self._acquire = redis.register_script(_ACQUIRE)
        self._extend = redis.register_script(_EXTEND)
        self._release = redis.register_script(_RELEASE)

    def lock_key(self, key: str) -> str:
        return f"{self.config.namespace}:lock:{key}"

    async def try_acquire(self, key: str) -> Lease | None:
        """Take the lock of `key` with a fresh fencing token; None when another holder has it."""
        try:
            keys = [self.lock_key(key), f"{self.config.namespace}:fence"]
            sent_at = time.monotonic()
            token = int(await self._acquire(keys=keys, args=[self.config.lease_ms]))
        except RedisError as exc:
            raise BackendError(f"redis lock failed: {exc}") from exc
        return Lease(self, key, token, sent_at=sent_at) if token else None

    async def extend(self, key: str, token: int) -> bool:
        try:
            return bool(await self._extend(keys=[self.lock_key(key)], args=[token, self.config.lease_ms]))
        except RedisError as exc:
            raise BackendError(f"redis extend failed: {exc}") from exc

    async def release(self, key: str, token: int) -> bool:
        try:
            return bool(await self._release(keys=[self.lock_key(key)], args=[token]))
        except RedisError as exc:
            raise BackendError(f"redis release failed: {exc}") from exc

    async def held(self, key: str) -> bool:
        try:
            return bool(await self.redis.exists(self.lock_key(key)))
        except RedisError as exc:
            raise BackendError(f"redis exists failed: {exc}") from exc

    async def polls(self) -> AsyncIterator[int]:
        """Yields 0, 1, 2… at a growing interval until `wait_timeout_s` has passed (then stops)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.wait_timeout_s
        delay = self.config.poll_initial_s
        attempt = 0
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.config.poll_max_s)
            yield attempt
            attempt += 1


class Invalidator:
    """Publishes and receives L1 invalidations on one Redis channel, reconnecting forever with back-off.

    Messages are JSON: ``{"key": k}`` drops one entry, ``{"tenant": t, "user": u|null}`` a purge, and
    ``{"all": true}`` everything. `drop` receives the decoded message; `reset` is called after every
    (re)subscription, because messages sent while disconnected are lost.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        config: SharedConfig,
        *,
        drop: Callable[[dict[str, object]], None],
        reset: Callable[[], None],
    ) -> None:
        self.redis = redis
        self.channel = f"{config.namespace}:invalidate"
        self._drop, self._reset = drop, reset
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.received = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def publish(self, message: dict[str, object]) -> None:
        """Tell every replica (this one included) to drop what `message` names; failures are logged."""
        try:
            await self.redis.publish(self.channel, orjson.dumps(message))
        except RedisError as exc:
            log.warning("invalidation not published", extra={"error": str(exc)})

    async def _run(self) -> None:
        delay = 0.05
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._reset()
                self.connected.set()
                delay = 0.05
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.received += 1
                        self._drop(orjson.loads(message["data"]))
            except (RedisError, OSError, ValueError) as exc:
                self.connected.clear()
                log.warning("invalidation channel down", extra={"error": str(exc)})
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
