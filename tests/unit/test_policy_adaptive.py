"""AdaptiveCostPolicy (cost-aware LeCaR): the contract, cost-awareness, and the weight update."""

from __future__ import annotations

import pytest

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy import AdaptiveCostPolicy
from cachelm.policy.adaptive import FREQUENCY, RECENCY
from tests.unit.policy_contract import PolicyContract


class TestAdaptiveContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> AdaptiveCostPolicy:
        return AdaptiveCostPolicy(
            max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock
        )


def test_cheap_entries_go_first_whichever_expert_decides() -> None:
    for seed in range(5):
        policy = AdaptiveCostPolicy(max_entries=3, seed=seed)
        policy.insert("cheap", 100, cost=1.0)
        policy.insert("pricey1", 100, cost=100.0)
        policy.insert("pricey2", 100, cost=100.0)
        assert policy.insert("new", 100, cost=50.0) == ["cheap"]


def test_counts_survive_eviction() -> None:
    policy = AdaptiveCostPolicy(max_entries=2)
    policy.insert("hot", 1, cost=0.001)  # cheap, so it is evicted despite being popular
    for _ in range(4):
        policy.access("hot")
    policy.insert("a", 1, cost=1.0)
    assert policy.insert("b", 1, cost=1.0) == ["hot"]
    remembered = policy.expected_uses("hot")
    assert remembered is not None and 4.9 < remembered <= 5.0
    policy.insert("hot", 1, cost=1.0)  # back, now as valuable as the others, with its popularity
    assert policy.insert("c", 1, cost=1.0) != ["hot"] and "hot" in policy
    assert policy.expected_uses("never") is None


def test_expert_that_evicted_a_returning_key_loses_weight() -> None:
    policy = AdaptiveCostPolicy(max_entries=3, weight_floor=0.0)
    policy.weights = [1.0, 0.0]  # follow the recency expert
    policy.insert("a", 1, cost=10.0)
    for _ in range(3):
        policy.access("a")
    i = 0
    while "a" in policy:  # recency ages `a` out; frequency would still keep its 4 requests x cost 10
        policy.insert(f"k{i}", 1, cost=1.0)
        i += 1
        assert i < 1000
    assert "a" in policy._regret[RECENCY] and not policy._regret[FREQUENCY]
    policy.weights = [0.5, 0.5]
    policy.insert("a", 1, cost=10.0)  # the mistake comes back: recency pays
    assert policy.weights[RECENCY] < 0.5 < policy.weights[FREQUENCY]


def test_byte_bound_learns_the_horizon_at_first_eviction() -> None:
    policy = AdaptiveCostPolicy(max_bytes=10)
    for i in range(10):
        policy.insert(f"k{i}", 1)
    assert policy._horizon == 0
    policy.insert("x", 1)
    assert policy._horizon == 10 and len(policy) == 10


def test_weights_respect_the_floor() -> None:
    policy = AdaptiveCostPolicy(max_entries=2, weight_floor=0.1, seed=1)
    for i in range(3000):
        policy.insert(f"k{i % 5}", 1, cost=float(1 + i % 3))
        policy.access("k0")
    assert 0.1 <= policy.weights[RECENCY] <= 0.9
    assert sum(policy.weights) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"learning_rate": 0}, "`learning_rate`"), ({"weight_floor": 0.5}, "`weight_floor`")]
)
def test_bad_parameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        AdaptiveCostPolicy(max_entries=2, **kwargs)  # type: ignore[arg-type]
