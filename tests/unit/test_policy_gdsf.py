"""GDSF: the contract, plus exact priorities and eviction order (cost- and size-aware)."""

from __future__ import annotations

import pytest

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy import GDSFPolicy
from tests.unit.policy_contract import PolicyContract


class TestGDSFContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> GDSFPolicy:
        return GDSFPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)


def test_gdsf_evicts_cheap_large_rare_first_and_inflates() -> None:
    policy = GDSFPolicy(max_entries=3)
    policy.insert("cheap", 10, cost=1.0)  # H = 0.1
    policy.insert("pricey", 10, cost=50.0)  # H = 5
    policy.insert("small", 1, cost=1.0)  # H = 1
    assert list(policy) == ["cheap", "small", "pricey"]
    assert policy.insert("new", 10, cost=1.0) == ["cheap"]
    assert policy.inflation == pytest.approx(0.1)
    assert policy.priority("new") == pytest.approx(0.1 + 0.1)
    policy.access("small")  # H = 0.1 + 2 * 1 / 1 = 2.1
    assert policy.priority("small") == pytest.approx(2.1)
    assert policy.insert("x", 1, cost=1.0) == ["new"]  # new: 0.2 is the lowest
    assert policy.inflation == pytest.approx(0.2)
    assert list(policy) == ["x", "small", "pricey"]  # x: 0.2 + 1 = 1.2


def test_gdsf_ties_go_to_the_earliest_touched() -> None:
    policy = GDSFPolicy(max_entries=2)
    policy.insert("a", 1)
    policy.insert("b", 1)
    assert policy.insert("c", 1) == ["a"]
    assert policy.insert("d", 1) == ["b"]


def test_gdsf_heap_stays_bounded_under_many_hits() -> None:
    policy = GDSFPolicy(max_entries=4)
    for key in "abcd":
        policy.insert(key, 1)
    for _ in range(10_000):
        policy.access("a")
    assert len(policy._heap.heap) <= 2 * len(policy) + 65
    assert policy.insert("e", 1) == ["b"]
