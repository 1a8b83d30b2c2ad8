"""In-process single-flight: concurrent calls for the same key run the computation once.

`SingleFlight` serves threads, `AsyncSingleFlight` serves coroutines on an event loop. Both follow the
same contract:

- The first caller for a key (the *leader*) runs the computation; callers that arrive while it runs (the
  *followers*) wait and receive the leader's result. ``do`` returns ``(value, shared)``; ``shared`` is True
  for followers.
- A computation that raises is not remembered: its exception reaches the leader and every follower that
  was waiting, and the next call for the key runs the computation again.
- Once a flight lands, the key is free again; single-flight is a coalescing device, not a cache.

Across several processes or replicas a distributed lock is needed on top (DESIGN.md: Redis SET NX PX);
these classes are the in-process half of that.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    """One running computation: waiters block on `done` and then read `value` or `error`."""

    __slots__ = ("done", "error", "followers", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.followers = 0


class SingleFlight(Generic[T]):
    """Thread single-flight keyed by any hashable. O(1) per call besides the computation itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[T]] = {}

    def do(self, key: Hashable, fn: Callable[[], T]) -> tuple[T, bool]:
        """Run `fn` once for all concurrent callers of `key`; returns ``(value, shared)``."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.followers += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value, True  # type: ignore[return-value]  # set by the leader before `done`
        try:
            flight.value = fn()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            # Remove before waking followers, so a caller arriving after the landing starts a new flight.
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.value, False

    def in_flight(self, key: Hashable) -> bool:
        """True while a computation for `key` is running."""
        with self._lock:
            return key in self._flights

    def waiting(self, key: Hashable) -> int:
        """How many followers wait on the flight of `key` (0 when none runs); for tests and metrics."""
        with self._lock:
            flight = self._flights.get(key)
            return 0 if flight is None else flight.followers

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)


class AsyncSingleFlight(Generic[T]):
    """Coroutine single-flight. Flights are per event loop, since an asyncio task belongs to one loop.

    The computation runs as its own task and every caller awaits it through `asyncio.shield`: a caller
    that is cancelled (a client that disconnects) stops waiting, but the computation goes on for the
    others, and its result is still delivered to whoever waits.
    """

    def __init__(self) -> None:
        self._flights: dict[tuple[int, Hashable], asyncio.Task[T]] = {}
        self._followers: dict[tuple[int, Hashable], int] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Await `fn()` once for all concurrent callers of `key`; returns ``(value, shared)``."""
        slot = (id(asyncio.get_running_loop()), key)
        task = self._flights.get(slot)
        shared = task is not None
        if task is None:
            task = asyncio.ensure_future(_call(fn))
            self._flights[slot] = task
            self._followers[slot] = 0
            task.add_done_callback(lambda t: self._land(slot, t))
        else:
            self._followers[slot] += 1
        return await asyncio.shield(task), shared

    def _land(self, slot: tuple[int, Hashable], task: asyncio.Task[T]) -> None:
        if self._flights.get(slot) is task:
            del self._flights[slot]
            del self._followers[slot]
        # Mark the exception as retrieved: when every waiter was cancelled nobody else will read it.
        if not task.cancelled():
            task.exception()

    def in_flight(self, key: Hashable) -> bool:
        """True while a computation for `key` runs on the current event loop."""
        return (id(asyncio.get_running_loop()), key) in self._flights

    def waiting(self, key: Hashable) -> int:
        """How many followers wait on the flight of `key` on the current loop (0 when none runs)."""
        return self._followers.get((id(asyncio.get_running_loop()), key), 0)

    def __len__(self) -> int:
        return len(self._flights)


async def _call(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()
