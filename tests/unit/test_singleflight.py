"""Single-flight: concurrent calls per key compute once; failures reach every waiter and are forgotten."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from cachelm.response.singleflight import AsyncSingleFlight, SingleFlight


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def _run_threads(n: int, target: Callable[[], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_concurrent_calls_share_one_computation() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = threading.Event()
    calls: list[int] = []
    results: list[tuple[int, bool]] = []

    def compute() -> int:
        calls.append(1)
        release.wait(10)
        return 42

    threads = _run_threads(5, lambda: results.append(flight.do("k", compute)))
    _wait_until(lambda: flight.waiting("k") == 4)
    assert flight.in_flight("k") and len(flight) == 1
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [1]
    assert sorted(results) == [(42, False)] + [(42, True)] * 4
    assert not flight.in_flight("k") and len(flight) == 0


def test_different_keys_do_not_wait_for_each_other() -> None:
    flight: SingleFlight[str] = SingleFlight()
    release = threading.Event()
    slow = threading.Thread(target=lambda: flight.do("slow", lambda: str(release.wait(10))))
    slow.start()
    _wait_until(lambda: flight.in_flight("slow"))
    assert flight.do("fast", lambda: "done") == ("done", False)  # returns while "slow" is still running
    release.set()
    slow.join(10)


def test_an_exception_reaches_every_waiter_and_is_not_remembered() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = threading.Event()
    errors: list[str] = []

    def compute() -> int:
        release.wait(10)
        raise ValueError("upstream failed")

    def call() -> None:
        try:
            flight.do("k", compute)
        except ValueError as exc:
            errors.append(str(exc))

    threads = _run_threads(3, call)
    _wait_until(lambda: flight.waiting("k") == 2)
    release.set()
    for t in threads:
        t.join(10)
    assert errors == ["upstream failed"] * 3
    assert flight.do("k", lambda: 7) == (7, False)  # the failure left nothing behind


def test_sequential_calls_each_compute() -> None:
    flight: SingleFlight[int] = SingleFlight()
    counter = iter(range(100))
    assert flight.do("k", lambda: next(counter)) == (0, False)
    assert flight.do("k", lambda: next(counter)) == (1, False)


async def test_async_concurrent_calls_share_one_computation() -> None:
    flight: AsyncSingleFlight[int] = AsyncSingleFlight()
    release = asyncio.Event()
    calls: list[int] = []

    async def compute() -> int:
        calls.append(1)
        await release.wait()
        return 9

    tasks = [asyncio.create_task(flight.do("k", compute)) for _ in range(6)]
    while flight.waiting("k") < 5:
        await asyncio.sleep(0)
    assert flight.in_flight("k")
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == [1]
    assert sorted(results) == [(9, False)] + [(9, True)] * 5
    assert not flight.in_flight("k") and len(flight) == 0


async def test_async_exception_reaches_every_waiter_and_is_not_remembered() -> None:
    flight: AsyncSingleFlight[int] = AsyncSingleFlight()

    async def compute() -> int:
        await asyncio.sleep(0.01)
        raise KeyError("gone")

    outcomes = await asyncio.gather(*(flight.do("k", compute) for _ in range(4)), return_exceptions=True)
    assert all(isinstance(o, KeyError) for o in outcomes)

    async def ok() -> int:
        return 1

    assert await flight.do("k", ok) == (1, False)


async def test_async_a_cancelled_waiter_does_not_cancel_the_computation() -> None:
    flight: AsyncSingleFlight[str] = AsyncSingleFlight()
    release = asyncio.Event()

    async def compute() -> str:
        await release.wait()
        return "answer"

    leader = asyncio.create_task(flight.do("k", compute))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flight.do("k", compute))
    await asyncio.sleep(0)
    leader.cancel()  # e.g. the client that triggered the computation disconnected
    with pytest.raises(asyncio.CancelledError):
        await leader
    release.set()
    assert await follower == ("answer", True)
