"""TinyLFU admission: the contract (over several inner policies), plus admission decisions."""

from __future__ import annotations

import pytest

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy import FrequencySketch, GDSFPolicy, LRUPolicy, S3FIFOPolicy, TinyLFUPolicy, TTLPolicy
from tests.unit.policy_contract import PolicyContract


class TestTinyLFUOverLRUContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> TinyLFUPolicy:
        return TinyLFUPolicy(
            LRUPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)
        )


class TestTinyLFUOverS3FIFOContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> TinyLFUPolicy:
        inner = S3FIFOPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)
        return TinyLFUPolicy(inner, large_bytes=10)


class TestWTinyLFUOverGDSFContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> TinyLFUPolicy:
        inner = GDSFPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)
        return TinyLFUPolicy(inner, window_ratio=0.3)


class TestAdaptiveWindowContract(PolicyContract):
    """A period of 8 requests: the window resizes (and evicts) every few operations."""

    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> TinyLFUPolicy:
        inner = GDSFPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)
        sketch = FrequencySketch(width=16, sample_size=8)
        return TinyLFUPolicy(inner, sketch=sketch, window_ratio=0.3, adapt_window=True)


def test_window_admits_newcomers_then_filters_them_into_main() -> None:
    inner = LRUPolicy(max_entries=10)
    policy = TinyLFUPolicy(inner, window_ratio=0.2)
    assert policy.window is not None and policy.window.max_entries == 2 and inner.max_entries == 8
    for i in range(8):  # fill: each key passes through the window into main (room there)
        policy.insert(f"hot{i}", 1)
        for _ in range(3):
            policy.access(f"hot{i}")
    policy.insert("w1", 1)
    policy.insert("w2", 1)
    assert len(policy) == 10 and {"w1", "w2"} <= set(policy.window)
    policy.access("w2")  # a newcomer can hit while in the window; w1 is now the window's LRU
    # A third newcomer pushes w1 out of the window; w1 (1 request) loses to main's victim (4): refused.
    assert policy.insert("w3", 1) == ["w1"]
    assert policy.rejected == 1 and len(policy) == 10 and policy.total_bytes == 10
    for _ in range(6):
        policy.access("w2")  # w2 becomes popular while in the window
    assert policy.insert("w4", 1) == ["w3"]  # w3 leaves the window first and is refused
    evicted = policy.insert("w5", 1)  # now w2 leaves the window and beats main's LRU victim
    assert evicted == ["hot0"] and "w2" in policy.inner and len(policy) == 10


def test_window_needs_a_plain_inner_policy() -> None:
    from cachelm.policy import TTLPolicy

    with pytest.raises(ConfigError, match="window"):
        TinyLFUPolicy(TTLPolicy(ttl=1, max_entries=100))
    assert TinyLFUPolicy(TTLPolicy(ttl=1, max_entries=100), window_ratio=0).window is None


def test_rare_large_key_is_refused_frequent_one_admitted() -> None:
    policy = TinyLFUPolicy(LRUPolicy(max_entries=2))
    for key in ("a", "b"):
        policy.insert(key, 100)
        for _ in range(3):
            policy.access(key)
    assert policy.insert("scan", 100) == ["scan"] and "scan" not in policy
    assert policy.rejected == 1
    for _ in range(6):
        policy.insert("rising", 100)  # refused each time, but every request is counted
    assert "rising" in policy
    assert set(policy) == {"rising", "b"}


def test_small_values_bypass_the_filter() -> None:
    policy = TinyLFUPolicy(LRUPolicy(max_entries=2), large_bytes=1000)
    policy.insert("a", 5000)
    policy.access("a")
    policy.insert("b", 5000)
    policy.access("b")
    assert policy.insert("small", 10) == ["a"]  # admitted without comparison
    assert policy.insert("big", 5000) == ["big"]  # seen once, rarer than the victim


def test_without_victim_peek_uses_threshold() -> None:
    policy = TinyLFUPolicy(S3FIFOPolicy(max_entries=2), min_frequency=2)
    policy.insert("a", 1)
    policy.insert("b", 1)
    assert policy.insert("c", 1) == ["c"]  # first sighting
    evicted = policy.insert("c", 1)  # second sighting: admitted
    assert "c" in policy and len(evicted) == 1


def test_updates_are_never_refused() -> None:
    policy = TinyLFUPolicy(GDSFPolicy(max_entries=1))
    policy.insert("a", 1)
    assert policy.insert("a", 1) == []
    assert "a" in policy


def test_adaptive_window_climbs_while_the_hit_ratio_holds_and_turns_when_it_falls() -> None:
    inner = LRUPolicy(max_entries=1000)
    policy = TinyLFUPolicy(inner, sketch=FrequencySketch(width=64, sample_size=100), adapt_window=True)
    assert policy.window is not None and policy.window.max_entries == 10
    for i in range(100):  # period 1: misses only; the first step grows the window by 6.25%
        policy.insert(f"k{i}", 1)
    assert policy.window_ratio == pytest.approx(0.01 + 0.0625) and policy.window.max_entries == 72
    for _ in range(100):  # period 2: hits (the ratio rose): one more step up, 2% shorter
        policy.access("k99")
    policy.insert("x", 1)
    assert policy.window_ratio == pytest.approx(0.0725 + 0.0625 * 0.98) and policy.window.max_entries == 133
    for i in range(100):  # period 3: misses again (the ratio fell): the climber turns
        policy.insert(f"y{i}", 1)
    assert policy.window_ratio == pytest.approx(0.13375 - 0.0625 * 0.98**2)
    assert policy.window.max_entries == 73 and inner.max_entries == 927 and len(policy) <= 1000


def test_adaptive_window_needs_a_window_and_an_evicting_inner_policy() -> None:
    with pytest.raises(ConfigError, match="`adapt_window`"):
        TinyLFUPolicy(LRUPolicy(max_entries=100), window_ratio=0, adapt_window=True)
    with pytest.raises(ConfigError, match="`adapt_window`"):
        TinyLFUPolicy(TTLPolicy(ttl=1, max_entries=100), window_ratio=0, adapt_window=True)
    assert not TinyLFUPolicy(LRUPolicy(), adapt_window=True).adapt_window  # unbounded: no window to size
