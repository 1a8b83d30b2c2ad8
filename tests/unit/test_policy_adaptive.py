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


def test_frequency_expert_remembers_popularity_across_evictions() -> None:
    policy = AdaptiveCostPolicy(max_entries=2, weight_floor=0.0)
    policy.weights = [0.0, 1.0]  # follow the frequency expert only
    for _ in range(5):  # "hot" is requested (missed and re-inserted) many times
        policy.insert("hot", 1)
        policy.remove("hot")
    policy.insert("hot", 1)
    policy.insert("cold", 1)
    assert policy.insert("other", 1) == ["cold"]  # hot's remembered frequency protects it


def test_expert_that_evicted_a_returning_key_loses_weight() -> None:
    policy = AdaptiveCostPolicy(max_entries=2, weight_floor=0.0)
    policy.weights = [1.0, 0.0]  # force the recency expert
    policy.insert("a", 1)
    policy.access("a")
    policy.access("a")  # frequency prefers a, recency prefers whichever was used least recently
    policy.insert("b", 1)
    policy.access("a")
    policy.insert("c", 1)  # recency's victim b is also frequency's: no blame; history stays empty
    assert policy.weights == [1.0, 0.0]
    policy.insert("d", 1)  # recency evicts a (least recent), frequency would have evicted c
    assert "a" not in policy and "a" in policy._history[RECENCY]
    policy.weights = [0.5, 0.5]
    policy.insert("a", 1)  # the mistake comes back: recency pays
    assert policy.weights[RECENCY] < 0.5 < policy.weights[FREQUENCY]


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
