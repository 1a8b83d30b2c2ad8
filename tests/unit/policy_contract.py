"""The contract every `Policy` honours, written once and reused by each policy test class (cachetools style).

A test class mixes `PolicyContract` in and defines `make(max_entries=..., max_bytes=..., timer=...)`. The
membership model used throughout is the policy's own report: a key is tracked after `insert` unless the
returned eviction list names it, and stops being tracked when an eviction list names it or it is removed.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelm.clock import Clock, ManualClock
from cachelm.errors import ConfigError
from cachelm.policy.base import Policy

KEYS = [f"k{i}" for i in range(12)]
# The mixin's @given tests run once per policy class (a different `self` each time); `make` builds a fresh
# policy per example, so nothing leaks between executors and this health check does not apply.
_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.differing_executors]}

_ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "access", "access", "remove"]),
        st.sampled_from(KEYS),
        st.integers(min_value=0, max_value=30),
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0]),
    ),
    max_size=80,
)


class PolicyContract:
    """Mixin: subclasses implement `make`."""

    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> Policy:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------------------
    def _replay(self, policy: Policy, ops: list[tuple[str, str, int, float]]) -> None:
        """Run `ops`, checking after each one that the policy matches the membership model and capacities."""
        tracked: dict[str, int] = {}
        for op, key, size, cost in ops:
            if op == "insert":
                evicted = policy.insert(key, size, cost)
                assert len(evicted) == len(set(evicted)), f"a key evicted twice: {evicted}"
                for victim in evicted:
                    assert victim in tracked or victim == key, f"evicted untracked {victim!r}"
                    tracked.pop(victim, None)
                if key not in evicted:
                    tracked[key] = size
            elif op == "access":
                policy.access(key)
            else:
                policy.remove(key)
                tracked.pop(key, None)
            assert set(policy) == set(tracked)
            assert len(policy) == len(tracked)
            assert all(k in policy for k in tracked)
            assert policy.total_bytes == sum(tracked.values())
            if policy.max_entries is not None:
                assert len(policy) <= policy.max_entries
            if policy.max_bytes is not None:
                assert policy.total_bytes <= policy.max_bytes

    # -- properties ---------------------------------------------------------------------------------------
    @settings(max_examples=40, **_SETTINGS)  # type: ignore[arg-type]
    @given(ops=_ops, max_entries=st.one_of(st.none(), st.integers(1, 6)))
    def test_membership_and_entry_capacity(self, ops: list[Any], max_entries: int | None) -> None:
        self._replay(self.make(max_entries=max_entries, timer=ManualClock()), ops)

    @settings(max_examples=40, **_SETTINGS)  # type: ignore[arg-type]
    @given(ops=_ops, max_bytes=st.integers(1, 60))
    def test_membership_and_byte_capacity(self, ops: list[Any], max_bytes: int) -> None:
        self._replay(self.make(max_bytes=max_bytes, timer=ManualClock()), ops)

    @settings(max_examples=25, **_SETTINGS)  # type: ignore[arg-type]
    @given(ops=_ops, max_entries=st.integers(1, 6), max_bytes=st.integers(1, 60))
    def test_both_capacities(self, ops: list[Any], max_entries: int, max_bytes: int) -> None:
        self._replay(self.make(max_entries=max_entries, max_bytes=max_bytes, timer=ManualClock()), ops)

    def test_many_random_operations(self) -> None:
        rng = random.Random(7)
        ops = [
            (
                rng.choice(["insert", "access", "access", "remove"]),
                f"k{rng.randrange(40)}",
                rng.randrange(50),
                1.0,
            )
            for _ in range(3000)
        ]
        self._replay(self.make(max_entries=10, max_bytes=200, timer=ManualClock()), ops)

    # -- examples -----------------------------------------------------------------------------------------
    def test_unbounded_keeps_everything(self) -> None:
        policy = self.make(timer=ManualClock())
        for i in range(50):
            assert policy.insert(f"k{i}", i, 1.0) == []
        assert len(policy) == 50 and policy.total_bytes == sum(range(50))

    def test_entry_capacity_evicts_exactly_one_per_new_key(self) -> None:
        policy = self.make(max_entries=3, timer=ManualClock())
        for key in ("a", "b", "c"):
            assert policy.insert(key, 1) == []
        evicted = policy.insert("d", 1)
        assert len(evicted) == 1 and len(policy) == 3
        assert evicted[0] != "d" or "d" not in policy

    def test_oversized_entry_is_refused_and_forgotten(self) -> None:
        policy = self.make(max_bytes=10, timer=ManualClock())
        assert policy.insert("a", 4) == []
        assert policy.insert("big", 11) == ["big"]
        assert "big" not in policy and "a" in policy and policy.total_bytes == 4
        assert policy.insert("a", 11) == ["a"]  # an update that no longer fits drops the key
        assert "a" not in policy and policy.total_bytes == 0

    def test_update_changes_size_without_duplicating(self) -> None:
        policy = self.make(max_bytes=100, timer=ManualClock())
        policy.insert("a", 10)
        policy.insert("a", 30)
        assert len(policy) == 1 and policy.total_bytes == 30
        assert list(policy) == ["a"]

    def test_growing_update_evicts_others(self) -> None:
        policy = self.make(max_bytes=10, timer=ManualClock())
        policy.insert("a", 3)
        policy.insert("b", 3)
        evicted = policy.insert("b", 9)
        assert policy.total_bytes <= 10 and set(evicted) <= {"a", "b"} and evicted

    def test_remove_and_access_of_unknown_keys_are_noops(self) -> None:
        policy = self.make(max_entries=2, timer=ManualClock())
        policy.access("nope")
        policy.remove("nope")
        assert len(policy) == 0 and policy.total_bytes == 0

    def test_remove_frees_room(self) -> None:
        policy = self.make(max_entries=2, timer=ManualClock())
        policy.insert("a", 1)
        policy.insert("b", 1)
        policy.remove("a")
        assert policy.insert("c", 1) == []
        assert set(policy) == {"b", "c"}

    def test_zero_size_and_zero_cost_are_valid(self) -> None:
        policy = self.make(max_entries=2, timer=ManualClock())
        assert policy.insert("a", 0, 0.0) == []
        policy.access("a")
        assert "a" in policy and policy.total_bytes == 0

    @pytest.mark.parametrize(
        ("key", "size", "cost", "name"),
        [
            ("", 1, 1.0, "`key`"),
            (3, 1, 1.0, "`key`"),
            ("a", -1, 1.0, "`size`"),
            ("a", 1.5, 1.0, "`size`"),
            ("a", True, 1.0, "`size`"),
            ("a", 1, -1.0, "`cost`"),
            ("a", 1, math.nan, "`cost`"),
            ("a", 1, math.inf, "`cost`"),
            ("a", 1, "1", "`cost`"),
        ],
    )
    def test_bad_insert_arguments_raise(self, key: Any, size: Any, cost: Any, name: str) -> None:
        policy = self.make(max_entries=2, timer=ManualClock())
        with pytest.raises(ConfigError, match=name):
            policy.insert(key, size, cost)
        assert len(policy) == 0

    def test_bad_keys_on_access_and_remove_raise(self) -> None:
        policy = self.make(max_entries=2, timer=ManualClock())
        with pytest.raises(ConfigError, match="`key`"):
            policy.access(None)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="`key`"):
            policy.remove("")

    @pytest.mark.parametrize("kwargs", [{"max_entries": 0}, {"max_bytes": -5}])
    def test_bad_capacity_raises(self, kwargs: dict[str, int]) -> None:
        with pytest.raises(ConfigError):
            self.make(timer=ManualClock(), **kwargs)
