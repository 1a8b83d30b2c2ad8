"""LRU and FIFO: the contract, plus exact eviction order on hand-made sequences."""

from __future__ import annotations

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy import FIFOPolicy, LRUPolicy
from tests.unit.policy_contract import PolicyContract


class TestLRUContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> LRUPolicy:
        return LRUPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)


class TestFIFOContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> FIFOPolicy:
        return FIFOPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)


def test_lru_evicts_least_recently_used_in_order() -> None:
    policy = LRUPolicy(max_entries=3)
    for key in "abc":
        policy.insert(key, 1)
    policy.access("a")  # order now b, c, a
    assert policy.insert("d", 1) == ["b"]
    policy.insert("c", 1)  # an update is a use: order a, d, c
    assert list(policy) == ["a", "d", "c"]
    assert policy.insert("e", 1) == ["a"]
    assert policy.insert("f", 1) == ["d"]
    assert list(policy) == ["c", "e", "f"]


def test_lru_by_bytes_evicts_as_many_as_needed_in_order() -> None:
    policy = LRUPolicy(max_bytes=10)
    policy.insert("a", 4)
    policy.insert("b", 3)
    policy.insert("c", 3)
    policy.access("a")
    assert policy.insert("d", 6) == ["b", "c"]
    assert list(policy) == ["a", "d"] and policy.total_bytes == 10
    assert policy.insert("e", 10) == ["a", "d"]


def test_fifo_ignores_hits() -> None:
    policy = FIFOPolicy(max_entries=2)
    policy.insert("a", 1)
    policy.insert("b", 1)
    policy.access("a")
    policy.insert("a", 1)
    assert policy.insert("c", 1) == ["a"]
    assert policy.peek_victim() == "b"
