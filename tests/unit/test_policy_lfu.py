"""LFU: the contract, plus exact eviction order (lowest frequency, then least recently touched)."""

from __future__ import annotations

from cachelm.clock import Clock, monotonic_clock
from cachelm.policy import LFUPolicy
from tests.unit.policy_contract import PolicyContract


class TestLFUContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> LFUPolicy:
        return LFUPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)


def test_lfu_exact_eviction_order() -> None:
    policy = LFUPolicy(max_entries=3)
    for key in "abc":
        policy.insert(key, 1)
    policy.access("a")
    policy.access("a")  # a:3
    policy.access("b")  # b:2, c:1
    assert [policy.frequency(k) for k in "abc"] == [3, 2, 1]
    assert list(policy) == ["c", "b", "a"]
    assert policy.insert("d", 1) == ["c"]
    assert policy.insert("e", 1) == ["d"]  # d (freq 1) is the least frequent, e is new
    policy.access("e")
    policy.access("e")  # e:3 joins a's bucket after a
    assert list(policy) == ["b", "a", "e"]
    assert policy.insert("f", 1) == ["b"]
    assert policy.insert("g", 1) == ["f"]


def test_lfu_bucket_removal_keeps_order() -> None:
    policy = LFUPolicy(max_entries=4)
    for key in "abcd":
        policy.insert(key, 1)
    policy.access("b")
    policy.access("c")
    policy.remove("a")
    policy.remove("d")  # the frequency-1 bucket is now empty and unlinked
    assert policy.peek_victim() == "b"
    policy.insert("e", 1)
    assert list(policy) == ["e", "b", "c"]
    assert policy.frequency("zz") == 0
