"""TinyLFU admission against every victim a candidate displaces, and `peek_victims`, which names them.

A candidate larger than one entry makes `inner` evict several keys; the filter used to compare it with the
first of them only, so a key seen three times pushed out keys seen ten times after beating a one-hit wonder.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachelm.policy
from cachelm.clock import ManualClock
from cachelm.policy import AdaptiveCostPolicy, FIFOPolicy, GDSFPolicy, LFUPolicy, LRUPolicy, TinyLFUPolicy
from cachelm.policy._common import EvictingPolicy, VictimPeek
from cachelm.policy.adaptive import FREQUENCY
from cachelm.policy.gdsf import LazyHeap

Make = Callable[..., EvictingPolicy]
PEEKERS: dict[str, Make] = {
    "LRU": LRUPolicy,
    "FIFO": FIFOPolicy,
    "LFU": LFUPolicy,
    "GDSF": GDSFPolicy,
    "Adaptive": AdaptiveCostPolicy,
    # Every key sampled: the miniatures learn fast, so the followed expert changes within a short run.
    "Adaptive(sampled)": lambda **kw: AdaptiveCostPolicy(sample_rate=1.0, window_factor=1.0, **kw),
}


def test_every_exported_policy_that_peeks_is_tested() -> None:
    exported = {cls for _, cls in inspect.getmembers(cachelm.policy, inspect.isclass)}
    peekers = {cls for cls in exported if issubclass(cls, VictimPeek)}
    tested = {make for make in PEEKERS.values() if inspect.isclass(make)}
    assert peekers == tested


_ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "insert", "access", "remove"]),
        st.sampled_from([f"k{i}" for i in range(16)]),
        st.integers(min_value=0, max_value=30),
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0]),
    ),
    max_size=120,
)
_capacities = st.sampled_from(
    [{"max_entries": 4}, {"max_bytes": 60}, {"max_bytes": 25}, {"max_entries": 5, "max_bytes": 40}]
)


@pytest.mark.parametrize("name", list(PEEKERS))
@settings(max_examples=60, deadline=None)
@given(ops=_ops, capacity=_capacities)
def test_peek_victims_names_what_the_insert_evicts(
    name: str, ops: list[Any], capacity: dict[str, int]
) -> None:
    """Compared, not hard-coded: before each insert of a new key, the peeked keys are the insert's eviction
    list, with the sizes they were inserted with, and a twin policy that is never peeked at evicts exactly
    the same keys (peeking changes nothing)."""
    make = PEEKERS[name]
    policy, twin = make(timer=ManualClock(), **capacity), make(timer=ManualClock(), **capacity)
    assert isinstance(policy, VictimPeek)
    sizes: dict[str, int] = {}
    for op, key, size, cost in ops:
        if op == "insert":
            if key not in policy:
                peeked = policy.peek_victims(size)
                assert policy.peek_victims(size) == peeked  # a peek leaves the order as it was
                assert all(sizes[victim] == victim_size for victim, victim_size in peeked)
                if size > (policy.max_bytes or size):
                    assert peeked == []  # refused outright: the insert returns [key], evicting nobody
                else:
                    evicted = policy.insert(key, size, cost)
                    assert evicted == [victim for victim, _ in peeked]
                    assert twin.insert(key, size, cost) == evicted
                    sizes[key] = size
                    continue
            evicted = policy.insert(key, size, cost)
            assert twin.insert(key, size, cost) == evicted
            if key not in evicted:
                sizes[key] = size
        elif op == "access":
            policy.access(key)
            twin.access(key)
        else:
            policy.remove(key)
            twin.remove(key)
        assert list(policy) == list(twin)


@pytest.mark.parametrize("name", list(PEEKERS))
def test_peek_victims_is_empty_while_the_key_fits(name: str) -> None:
    policy = PEEKERS[name](max_bytes=10, timer=ManualClock())
    policy.insert("a", 4)
    assert policy.peek_victims(6) == []
    assert policy.peek_victims(7) == [("a", 4)]
    assert policy.peek_victims(11) == []  # could never fit: refused without evicting


def test_adaptive_peek_before_the_first_eviction_follows_the_order_that_eviction_will_use() -> None:
    """With only a byte bound, N is learned at the first eviction and re-keys the frequency heap; a peek
    before it must name the victims in the re-keyed order. `a` is a hair denser than `b` but older: `b` goes
    first without decay, `a` once N is known."""
    policy = AdaptiveCostPolicy(max_bytes=2000, timer=ManualClock())
    policy.insert("a", 1000, cost=1.0005)
    policy.insert("b", 1000, cost=1.0)
    policy.expert = FREQUENCY  # as the miniatures may choose before the first eviction
    assert policy.peek_victims(1000) == [("a", 1000)]
    assert policy.insert("c", 1000) == ["a"]


def test_lazy_heap_visit_lowest_stops_when_told_and_keeps_the_order() -> None:
    heap = LazyHeap()
    for key, priority in [("a", 3.0), ("b", 1.0), ("c", 2.0), ("d", 5.0), ("b", 4.0)]:  # b's 1.0 goes stale
        heap.push(key, priority)
    visited: list[str] = []

    def visit(key: str) -> bool:
        if len(visited) == 2:
            return False
        visited.append(key)
        return True

    heap.visit_lowest(visit)
    assert visited == ["c", "a"]
    assert [heap.pop()[1] for _ in range(len(heap))] == ["c", "a", "b", "d"]


# -- TinyLFU: the candidate against every victim, by bytes -------------------------------------------------


def _full_of_frequent_keys(make: Make) -> TinyLFUPolicy:
    """A 12-byte inner cache of 2-byte keys: `rare` (seen once, the first victim of every inner policy), then
    k2, k4, k6, k8, k10, each seen as many times as its name says. A 10-byte newcomer displaces `rare`, k2,
    k4, k6 and k8: their byte-weighted mean frequency is (1 + 2 + 4 + 6 + 8) / 5 = 4.2."""
    policy = TinyLFUPolicy(make(max_bytes=12, timer=ManualClock()), window_ratio=0)
    policy.insert("rare", 2)
    for seen in (2, 4, 6, 8, 10):
        policy.insert(f"k{seen}", 2)
        for _ in range(seen - 1):
            policy.access(f"k{seen}")
    return policy


INNER = ["LRU", "LFU", "GDSF", "Adaptive"]


@pytest.mark.parametrize("name", INNER)
def test_large_candidate_that_beats_only_the_first_victim_is_refused(name: str) -> None:
    policy = _full_of_frequent_keys(PEEKERS[name])
    assert policy.insert("big", 10) == ["big"]  # seen once: refused by the first victim too
    # Seen 2, then 3 times, `big` beats `rare` (once) but not the keys seen 2 to 8 times that go with it.
    assert policy.insert("big", 10) == ["big"]
    assert policy.insert("big", 10) == ["big"]
    assert set(policy) == {"rare", "k2", "k4", "k6", "k8", "k10"} and policy.rejected == 3


@pytest.mark.parametrize("name", INNER)
def test_large_candidate_requested_more_than_the_bytes_it_displaces_is_admitted(name: str) -> None:
    policy = _full_of_frequent_keys(PEEKERS[name])
    for _ in range(4):  # seen up to 4 times: 4 <= 4.2
        assert policy.insert("big", 10) == ["big"]
    # Seen 5 times: above the mean of its victims, though k6 and k8 are each seen more often.
    assert policy.insert("big", 10) == ["rare", "k2", "k4", "k6", "k8"]
    assert set(policy) == {"big", "k10"} and policy.total_bytes == 12


def test_victims_weigh_by_the_bytes_they_free() -> None:
    """A rare 8-byte victim and a frequent 2-byte one: (1 x 8 + 10 x 2) / 10 = 2.8 per byte."""
    policy = TinyLFUPolicy(LRUPolicy(max_bytes=10, timer=ManualClock()), window_ratio=0)
    policy.insert("rare", 8)
    policy.insert("hot", 2)
    for _ in range(9):
        policy.access("hot")
    assert policy.insert("new", 10) == ["new"]  # seen once
    assert policy.insert("new", 10) == ["new"]  # seen twice: 2 <= 2.8
    assert policy.insert("new", 10) == ["rare", "hot"]  # 3 > 2.8, though `hot` is seen 10 times
