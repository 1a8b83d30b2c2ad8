"""Review of the response layer's library API: memoize, the LangChain adapter, the embedding cache, metrics.

Each test here failed before the fix it names in its docstring.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cachelm.response.memoize import memoize
from cachelm.store.base import Record
from cachelm.store.memory import MemoryStore

# -- memoize ----------------------------------------------------------------------------------------------


def test_a_bound_method_keys_invalidates_and_clears_with_its_instance() -> None:
    """`obj.method.invalidate(x)` reached the unbound wrapper (a method object forwards attributes to its
    function), so the key function was called without `self`: a TypeError, and nothing invalidated."""
    store = MemoryStore()

    class Tools:
        def __init__(self, region: str) -> None:
            self.region = region
            self.calls = 0

        @memoize(store, key=lambda self, q: [self.region, q])
        def search(self, q: str) -> list[str]:
            self.calls += 1
            return [f"{self.region}:{q}"]

    eu, us = Tools("eu"), Tools("us")
    eu.search("x"), us.search("x")
    assert eu.search.cache_key("x") != us.search.cache_key("x")
    assert eu.search.cache_key("x") == Tools.search.cache_key(eu, "x")
    assert eu.search.invalidate("x") is True and eu.search.invalidate("x") is False
    assert eu.search("x") == ["eu:x"] and eu.calls == 2
    assert us.search("x") == ["us:x"] and us.calls == 1  # the other instance's entry was kept
    assert eu.search.__name__ == "search" and eu.search.tag == Tools.search.tag
    assert eu.search.cache_clear() == 2


class _PausingStore(MemoryStore):
    """A real memory store whose next `get` from the thread named in `pause_thread` returns its answer
    only once `resume` is set: it holds a reader between its miss and what it does next."""

    def __init__(self) -> None:
        super().__init__()
        self.pause_thread: int | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()

    def get(self, key: str) -> Record | None:
        record = super().get(key)
        if threading.get_ident() == self.pause_thread:
            self.pause_thread = None
            self.paused.set()
            self.resume.wait(10)
        return record


def test_a_miss_whose_flight_landed_meanwhile_does_not_compute_again() -> None:
    """A caller that read a miss and reached the single-flight after another caller's flight had landed
    computed again: memoize, unlike ExactCache, did not read the store once more inside its flight."""
    store = _PausingStore()
    calls: list[int] = []

    @memoize(store)
    def tool(x: int) -> dict[str, int]:
        calls.append(x)
        return {"x": x}

    late: list[dict[str, int]] = []

    def late_caller() -> None:
        store.pause_thread = threading.get_ident()
        late.append(tool(1))

    thread = threading.Thread(target=late_caller)
    thread.start()
    assert store.paused.wait(10)  # the late caller has read its miss
    assert tool(1) == {"x": 1}  # this call's flight computes, stores and lands
    store.resume.set()
    thread.join(10)
    assert late == [{"x": 1}] and calls == [1]


def test_callers_served_by_one_flight_get_their_own_copy() -> None:
    """Followers of a flight were handed the leader's very object: a caller that appended to the list it
    got changed the result every other concurrent caller held (a hit decodes a fresh copy each time)."""
    store = MemoryStore()
    release = threading.Event()

    @memoize(store)
    def slow(x: int) -> dict[str, Any]:
        release.wait(10)
        return {"items": [x]}

    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(slow(1))) for _ in range(4)]
    for t in threads:
        t.start()
    key = slow.cache_key(1)
    deadline = time.monotonic() + 10
    while slow._flights.waiting(key) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert results == [{"items": [1]}] * 4
    assert len({id(r) for r in results}) == 4 and len({id(r["items"]) for r in results}) == 4
