"""AdaptiveCostPolicy: the contract, cost-awareness, remembered counts and the miniatures' choice."""

from __future__ import annotations

import zlib

import pytest

from cachelm.clock import Clock, monotonic_clock
from cachelm.errors import ConfigError
from cachelm.policy import AdaptiveCostPolicy
from cachelm.policy.adaptive import FREQUENCY, RECENCY, _CostLRFU
from tests.unit.policy_contract import PolicyContract


class TestAdaptiveContract(PolicyContract):
    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> AdaptiveCostPolicy:
        return AdaptiveCostPolicy(
            max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock
        )


class TestAdaptiveFullSampleContract(PolicyContract):
    """Every request also runs through the miniatures, which then switch experts often."""

    def make(
        self, *, max_entries: int | None = None, max_bytes: int | None = None, timer: Clock | None = None
    ) -> AdaptiveCostPolicy:
        return AdaptiveCostPolicy(
            max_entries=max_entries, max_bytes=max_bytes, timer=timer or monotonic_clock, sample_rate=1.0
        )


@pytest.mark.parametrize("expert", [RECENCY, FREQUENCY])
def test_cheap_entries_go_first_whichever_expert_decides(expert: int) -> None:
    policy = _CostLRFU(
        max_entries=3, max_bytes=None, timer=monotonic_clock, experts=(expert,), history_factor=8
    )  # the single-expert cache each miniature is
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


def _request(policy: AdaptiveCostPolicy, key: str, cost: float = 1.0) -> bool:
    """Drive `policy` as the simulator does; True on a hit."""
    if key in policy:
        policy.access(key)
        return True
    policy.insert(key, 1, cost)
    return False


def test_miniatures_pick_frequency_when_an_old_favourite_returns() -> None:
    policy = AdaptiveCostPolicy(max_entries=2, sample_rate=1.0)
    for _ in range(3):
        _request(policy, "fav")
    # Fresh keys: GreedyDual's inflation ages `fav` out of the recency expert within a few evictions, while
    # the frequency expert keeps its 3 requests (half-life 256 N = 512 requests).
    for i in range(8):
        _request(policy, f"new{i}")
    assert "fav" in policy.minis[FREQUENCY] and "fav" not in policy.minis[RECENCY]
    _request(policy, "fav")
    # Scores decay by 1 - 1/(32 N) per sampled request (N = 2): two hits on `fav` (requests 2 and 3) for
    # both, then nine requests later the frequency miniature's third.
    d = 1 - 1 / 64
    assert policy.scores[RECENCY] == pytest.approx((d + 1) * d**9)
    assert policy.scores[FREQUENCY] == pytest.approx((d + 1) * d**9 + 1)
    assert policy.expert == FREQUENCY


def test_miniatures_pick_recency_when_recent_keys_are_reused() -> None:
    policy = AdaptiveCostPolicy(max_entries=2, sample_rate=1.0)
    for _ in range(5):
        _request(policy, "old")  # popular once, never again
    hits = 0
    for i in range(40):  # pairs reused at distance 2: only a cache that lets `old` go can hold both
        for _ in range(2):
            hits += _request(policy, f"x{i}a") + _request(policy, f"x{i}b")
    assert policy.scores[RECENCY] > policy.scores[FREQUENCY]
    assert policy.expert == RECENCY
    assert "old" not in policy and hits > 40


def test_only_sampled_keys_reach_the_miniatures() -> None:
    policy = AdaptiveCostPolicy(max_entries=10_000, sample_rate=0.125)
    keys = [f"key{i}" for i in range(2000)]
    for key in keys:
        policy.insert(key, 1)
    sampled = {k for k in keys if zlib.crc32(k.encode()) % 65536 < 8192}
    assert 150 < len(sampled) < 350
    for mini in policy.minis:
        assert set(mini) == sampled and mini.max_entries == 1250


def test_unbounded_policy_runs_no_miniatures() -> None:
    policy = AdaptiveCostPolicy()
    policy.insert("a", 10)
    assert policy.minis == () and "a" in policy


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sample_rate": 0}, "`sample_rate`"),
        ({"sample_rate": 1.5}, "`sample_rate`"),
        ({"window_factor": 0.5}, "`window_factor`"),
        ({"history_factor": 0}, "`history_factor`"),
    ],
)
def test_bad_parameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        AdaptiveCostPolicy(max_entries=2, **kwargs)  # type: ignore[arg-type]
