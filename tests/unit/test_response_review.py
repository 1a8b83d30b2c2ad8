"""Review of the response layer's library API: memoize, the LangChain adapter, the embedding cache, metrics.

Each test here failed before the fix it names in its docstring.
"""

from __future__ import annotations

from cachelm.response.memoize import memoize
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
