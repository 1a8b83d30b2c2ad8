"""Review of the response layer's library API: memoize, the LangChain adapter, the embedding cache, metrics.

Each test here failed before the fix it names in its docstring.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachelm.errors import ConfigError
from cachelm.metrics import CacheMetrics, Price
from cachelm.response.langchain import LangChainCache
from cachelm.response.memoize import memoize
from cachelm.semantic.embedder import HashingEmbedder
from cachelm.semantic.embedding_cache import EmbeddingCache
from cachelm.store.base import Record
from cachelm.store.memory import MemoryStore
from cachelm.store.sqlite import SQLiteStore
from tests.unit.test_memoize import four_callers_of_one_flight, regional_tools

# -- memoize ----------------------------------------------------------------------------------------------


def test_a_bound_method_keys_invalidates_and_clears_with_its_instance() -> None:
    """`obj.method.invalidate(x)` reached the unbound wrapper (a method object forwards attributes to its
    function), so the key function was called without `self`: a TypeError, and nothing invalidated."""
    Tools = regional_tools(MemoryStore())
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

    results = four_callers_of_one_flight(slow, release)
    assert results == [{"items": [1]}] * 4
    assert len({id(r) for r in results}) == 4 and len({id(r["items"]) for r in results}) == 4


# -- the LangChain adapter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"user": None}, "`user`"),
        ({"tags": [1]}, "`tags`"),
        ({"tags": [""]}, "`tags`"),
        ({"ttl": -1}, "`ttl`"),
        ({"ttl": float("inf")}, "`ttl`"),
        ({"ttl": "60"}, "`ttl`"),
    ],
)
def test_langchain_cache_checks_its_entry_options_up_front(options: dict[str, Any], name: str) -> None:
    """`user`, `tags` and `ttl` were taken unchecked; every later `update` then failed inside
    ExactCache.store, which the adapter logs and swallows: nothing was ever cached, and no error said so."""
    with pytest.raises(ConfigError, match=name):
        LangChainCache(MemoryStore(), **options)


def test_a_foreign_entry_that_cannot_be_dropped_is_still_a_miss(tmp_path: Path) -> None:
    """A lookup that found an entry it cannot decode dropped it with `ExactCache.invalidate`, an
    administrative call that raises: a store that could read but not write failed the model call."""
    path = tmp_path / "lc.db"
    with SQLiteStore(path, busy_timeout_s=0.05) as store:
        adapter = LangChainCache(store)
        key = adapter.cache.key_for(adapter._request("p", "cfg"), endpoint="langchain")
        store.put(Record(key=key, value=b'{"not": "generations"}', tags=frozenset({"langchain"})))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: reads work, deletes wait
        try:
            assert adapter.lookup("p", "cfg") is None
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert adapter.cache.metrics.count("errors", kind="decode") == 1
        assert adapter.cache.metrics.count("errors", kind="backend") == 1
        assert adapter.lookup("p", "cfg") is None and store.peek(key) is None  # dropped once it could be


# -- the embedding cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [float("inf"), "60", True, 0, -1])
def test_embedding_cache_checks_its_ttl_as_every_cache_does(ttl: Any) -> None:
    """The constructor's own check (``not ttl > 0``) let infinity and True through, and raised TypeError
    for a string. With ``ttl=inf`` every embedding call with a miss then failed: the record it stored had
    an infinite expiry, which `Record` refuses with a ConfigError the write path does not expect."""
    with pytest.raises(ConfigError, match="`ttl`"):
        EmbeddingCache(MemoryStore(), HashingEmbedder(dim=8), ttl=ttl)


def test_a_corrupt_vector_is_a_miss_counted_as_an_error() -> None:
    """A stored value that is not a vector of this embedder was a silent miss: nothing counted it, so a
    store returning garbage looked like a cold cache."""
    store = MemoryStore()
    cache = EmbeddingCache(store, HashingEmbedder(dim=8))
    store.put(Record(key=cache.key("hello"), value=b"\x00garbage", tags=frozenset({"embedding"})))
    vector, hit = cache.embed("hello")
    assert not hit and cache.stats.errors == 1 and cache.stats.misses == 1
    assert np.array_equal(vector, HashingEmbedder(dim=8).embed(["hello"])[0])
    assert cache.embed("hello")[1] and cache.stats.errors == 1  # rewritten, then served


# -- metrics ----------------------------------------------------------------------------------------------


def test_a_price_table_key_must_be_a_model_id_or_prefix() -> None:
    """`prices` keys were not checked (`set_price` checks its `model`): an empty key is a prefix of every
    model id, so every unpriced model was priced by it, and a key that is no string made the first hit that
    carried a usage raise TypeError from `str.startswith` on the serving path."""
    price = Price(input=1.0, output=1.0)
    for bad in ("", None, 7):
        with pytest.raises(ConfigError, match="`prices`"):
            CacheMetrics(prices={bad: price})  # type: ignore[dict-item]
    metrics = CacheMetrics(prices={"gpt-4o": price})
    metrics.hit("exact", model="llama-3", usage={"prompt_tokens": 10, "completion_tokens": 5})
    assert metrics.count("cost_saved_usd") == 0.0 and metrics.count("tokens_saved") == 15


@pytest.mark.parametrize("make", [lambda: Price(input=True, output=1.0), lambda: CacheMetrics(window=True)])
def test_a_bool_is_no_number_for_metrics(make: Any) -> None:
    """A bool passed the int checks of `Price` (True: a price of 1 USD) and of `window` (one observation)."""
    with pytest.raises(ConfigError):
        make()
