"""S3-FIFO: the contract, plus the paper's behaviour on hand-made sequences (S → M or G, CLOCK in M)."""

from __future__ import annotations

import pytest

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy import S3FIFOPolicy
from tests.unit.policy_contract import PolicyContract


class TestS3FIFOContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> S3FIFOPolicy:
        return S3FIFOPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock)


def test_one_hit_wonders_leave_through_small_into_ghost() -> None:
    policy = S3FIFOPolicy(max_entries=10)  # S share: 1 entry, M share: 9
    for i in range(10):
        policy.insert(f"k{i}", 1)
    assert policy.insert("new", 1) == ["k0"]
    assert policy.queue_of("k0") == "ghost"
    assert policy.insert("k0", 1) == ["k1"]  # back from the ghost: straight into M
    assert policy.queue_of("k0") == "main"


def test_hit_in_small_promotes_to_main_and_main_runs_clock() -> None:
    policy = S3FIFOPolicy(max_entries=10)
    for i in range(10):
        policy.insert(f"k{i}", 1)
    policy.access("k0")
    policy.access("k1")
    # k0 (hit) moves to M; k1 (hit) moves to M; k2 (never hit) leaves.
    assert policy.insert("a", 1) == ["k2"]
    assert policy.queue_of("k0") == "main" and policy.queue_of("k1") == "main"
    assert policy.queue_of("k2") == "ghost"
    # M now holds k0, k1 (counters 1 each) and is over its 9-entry share once it gets more: feed misses.
    evicted = [v for i in range(12) for v in policy.insert(f"m{i}", 1)]
    assert "k0" not in evicted[:7]  # the CLOCK pass spends k0's counter before k0 can leave
    assert len(policy) == 10


def test_counter_is_capped_at_three() -> None:
    policy = S3FIFOPolicy(max_entries=10)
    policy.insert("a", 1)
    for _ in range(10):
        policy.access("a")
    assert policy._freq["a"] == 3


def test_byte_capacity_and_ghost_bound() -> None:
    policy = S3FIFOPolicy(max_bytes=100)
    for i in range(200):
        policy.insert(f"k{i}", 10)
    assert policy.total_bytes <= 100
    assert policy._ghost.bytes <= 90


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"small_ratio": 0.0}, "`small_ratio`"), ({"move_to_main_threshold": 4}, "`move_to_main_threshold`")],
)
def test_bad_parameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        S3FIFOPolicy(max_entries=10, **kwargs)  # type: ignore[arg-type]
