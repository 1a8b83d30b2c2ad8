"""TinyLFU admission: the contract (over several inner policies), plus admission decisions."""

from __future__ import annotations

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy import GDSFPolicy, LRUPolicy, S3FIFOPolicy, TinyLFUPolicy
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
