"""TTL (absolute and sliding): the contract, plus exact expiry with an injected clock."""

from __future__ import annotations

import pytest

from cachelm.clock import Clock, ManualClock
from cachelm.errors import ConfigError
from cachelm.policy import LFUPolicy, LRUPolicy, TTLPolicy
from tests.unit.policy_contract import PolicyContract


class TestTTLContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> TTLPolicy:
        clock = timer or ManualClock()
        return TTLPolicy(ttl=1000.0, max_entries=max_entries, max_bytes=max_bytes, timer=clock)


class TestSlidingTTLOverLFUContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> TTLPolicy:
        clock = timer or ManualClock()
        inner = LFUPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=clock)
        return TTLPolicy(inner, ttl=1000.0, sliding=True, timer=clock)


def test_absolute_ttl_expired_keys_go_first_in_deadline_order() -> None:
    clock = ManualClock()
    policy = TTLPolicy(ttl=10, max_entries=3, timer=clock)
    policy.insert("a", 1)
    clock.advance(1)
    policy.insert("b", 1)
    clock.advance(1)
    policy.insert("c", 1)
    policy.access("a")  # absolute: a hit does not extend `a`
    assert policy.deadline("a") == 10
    clock.advance(9)  # t=11: a and b expired, c not
    assert policy.is_expired("a") and policy.is_expired("b") and not policy.is_expired("c")
    assert policy.insert("d", 1) == ["a", "b"]
    assert set(policy) == {"c", "d"}
    assert policy.insert("e", 1) == []
    assert policy.insert("f", 1) == ["c"]  # nothing expired: the inner LRU picks


def test_sliding_ttl_extends_on_hit_and_ignores_hits_after_expiry() -> None:
    clock = ManualClock()
    policy = TTLPolicy(ttl=10, sliding=True, timer=clock)
    policy.insert("a", 1)
    policy.insert("b", 1)
    clock.advance(8)
    policy.access("a")  # a now lives until t=18
    assert policy.deadline("a") == 18
    clock.advance(3)  # t=11
    policy.access("b")  # b expired at t=10: the access collects it instead of extending it
    assert policy.deadline("b") is None and "b" not in policy
    assert policy.expire() == []
    clock.advance(7)
    assert policy.expire() == ["a"] and len(policy) == 0 and policy.total_bytes == 0


def test_rewrite_restarts_ttl() -> None:
    clock = ManualClock()
    policy = TTLPolicy(ttl=5, timer=clock)
    policy.insert("a", 1)
    clock.advance(4)
    policy.insert("a", 2)
    clock.advance(4)
    assert policy.expire() == [] and policy.total_bytes == 2


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="`ttl`"):
        TTLPolicy(ttl=0)
    with pytest.raises(ConfigError, match="inner"):
        TTLPolicy(LRUPolicy(max_entries=2), ttl=1, max_entries=3)
    for bad in ("no", 1, None):
        with pytest.raises(ConfigError, match="`sliding`"):
            TTLPolicy(ttl=1, sliding=bad)  # type: ignore[arg-type]
