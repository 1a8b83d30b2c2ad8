"""Decision rules: static threshold, offline calibration, and the δ-bounded online policy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cachelm.errors import ConfigError
from cachelm.semantic import BoundedErrorConfig, BoundedErrorPolicy, StaticThreshold, calibrate_threshold
from cachelm.semantic.decision import clopper_pearson_lower, clopper_pearson_upper, threshold_curve


def test_static_threshold() -> None:
    rule = StaticThreshold(0.8)
    assert rule.decide(0.8, entry_id="e", region="r").serve
    assert not rule.decide(0.7999, entry_id="e", region="r").serve
    assert rule.decide(None, entry_id=None, region="r").reason == "no-candidate"
    with pytest.raises(ConfigError, match="`threshold`"):
        StaticThreshold(1.5)
    with pytest.raises(ConfigError, match="`similarity`"):
        rule.decide(math.nan, entry_id="e", region="r")


def test_gptcache_default_is_cosine_point_six() -> None:
    # distance <= 0.8 in squared L2 over unit vectors: 2 - 2cos <= 0.8
    assert StaticThreshold.gptcache_default().threshold == pytest.approx(0.6)


def test_clopper_pearson_matches_closed_forms() -> None:
    # k = 0: upper = 1 - alpha^(1/n); k = n: lower = alpha^(1/n)
    assert float(clopper_pearson_upper(0, 100, 0.05)) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert float(clopper_pearson_lower(100, 100, 0.05)) == pytest.approx(0.05 ** (1 / 100))
    assert float(clopper_pearson_upper(5, 5, 0.05)) == 1.0
    # the bound is above the estimate and shrinks with n
    assert 0.1 < float(clopper_pearson_upper(10, 100, 0.05)) < float(clopper_pearson_upper(1, 10, 0.05))


def test_threshold_curve_counts() -> None:
    c = threshold_curve(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    assert c["threshold"].tolist() == [0.9, 0.8, 0.1]
    assert c["tp"].tolist() == [1, 2, 2]
    assert c["fp"].tolist() == [0, 1, 2]
    assert c["fn"].tolist() == [1, 0, 0]


def test_calibration_recovers_a_separating_threshold() -> None:
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.8, 1.0, 500)
    neg = rng.uniform(0.3, 0.75, 500)
    s, y = np.r_[pos, neg], np.r_[np.ones(500), np.zeros(500)]
    cal = calibrate_threshold(s, y, objective="f1")
    assert cal.threshold == pytest.approx(pos.min())  # the lowest positive score: every positive, no negative
    assert cal.f1 == 1.0
    prec = calibrate_threshold(s, y, objective="precision", target_precision=0.99, alpha=0.05)
    assert prec.precision >= 0.99
    with pytest.raises(ConfigError, match="`objective`"):
        calibrate_threshold(s, y, objective="auc")
    with pytest.raises(ConfigError, match="no threshold"):
        calibrate_threshold([0.9, 0.8], [0, 0], objective="precision")


def _stream(policy: BoundedErrorPolicy, n: int, seed: int, p_wrong: object) -> dict[str, int]:
    """Lookups with s ~ U(0.3, 1) against a known P(wrong | s); the caller verifies when asked."""
    rng = random.Random(seed)
    out = {"lookups": 0, "hits": 0, "wrong_hits": 0, "verifications": 0}
    for i in range(n):
        s = rng.uniform(0.3, 1.0)
        wrong = rng.random() < p_wrong(s)  # type: ignore[operator]
        d = policy.decide(s, entry_id=f"e{i}", region="r")
        out["lookups"] += 1
        if d.serve:
            out["hits"] += 1
            out["wrong_hits"] += wrong
        elif d.verify:
            out["verifications"] += 1
            policy.observe(s, not wrong, entry_id=f"e{i}", region="r", sampled=d.sampled)
    return out


@pytest.mark.parametrize("delta", [0.01, 0.05])
def test_bounded_policy_keeps_false_hit_rate_below_delta(delta: float) -> None:
    # Wrong answers are likely below 0.8 and rare above: the best threshold is where FHR(t) reaches delta.
    def p_wrong(s: float) -> float:
        return 0.6 if s < 0.8 else 0.02

    policy = BoundedErrorPolicy(BoundedErrorConfig(delta=delta, explore_rate=0.2, seed=1))
    # Even with no candidate above t in W lookups, the frequency bound is 1 - (alpha/2)^(1/W): nothing can be
    # certified, so nothing served, before it drops to delta.
    min_samples = math.ceil(math.log(0.025) / math.log(1 - delta))
    warm = _stream(policy, min_samples - 1, seed=2, p_wrong=p_wrong)
    assert warm["hits"] == 0
    run = _stream(policy, 20_000, seed=3, p_wrong=p_wrong)
    assert run["hits"] > 0
    assert run["wrong_hits"] / run["lookups"] <= delta
    t = policy.threshold("r")
    # True FHR(t) = 0.02 * (1 - t) / 0.7 above 0.8: the certified t is never where it exceeds delta.
    assert 0.02 * (1 - t) / 0.7 <= delta or t >= 0.8
    assert policy.threshold("other-region") != policy.threshold("other-region")  # nan: nothing learned there


def test_bounded_policy_when_errors_are_everywhere() -> None:
    # Half of all candidates are wrong at every similarity: only a sliver at the very top may be served,
    # where FHR(t) = 0.5 * (1 - t) / 0.7 <= delta, i.e. t >= 0.986.
    policy = BoundedErrorPolicy(BoundedErrorConfig(delta=0.01, seed=0))
    run = _stream(policy, 5000, seed=4, p_wrong=lambda s: 0.5)
    assert run["wrong_hits"] / run["lookups"] <= 0.01
    t = policy.threshold("r")
    assert math.isnan(t) or t >= 0.986  # nothing certified, or only that sliver
    # Always wrong: FHR(t) = (1 - t) / 0.7 exceeds delta = 0.005 at every grid point (t <= 0.995).
    never = BoundedErrorPolicy(BoundedErrorConfig(delta=0.005, seed=0))
    assert _stream(never, 5000, seed=5, p_wrong=lambda s: 1.0)["hits"] == 0
    assert math.isnan(never.threshold("r"))


def test_entry_boundary_vetoes_a_wrong_entry() -> None:
    policy = BoundedErrorPolicy(BoundedErrorConfig(delta=0.05, explore_rate=1e-9, seed=0))
    _stream(policy, 3000, seed=5, p_wrong=lambda s: 0.0 if s > 0.6 else 0.5)  # certifies a threshold
    t = policy.threshold("r")
    assert not math.isnan(t) and t < 0.95
    assert policy.decide(0.95, entry_id="bad", region="r").serve
    policy.observe(0.95, False, entry_id="bad", region="r", sampled=False)
    d = policy.decide(0.95, entry_id="bad", region="r")
    assert not d.serve and d.verify and d.reason == "entry-veto"
    assert policy.decide(0.97, entry_id="bad", region="r").serve  # above its own boundary again
    policy.veto("bad")
    assert not policy.decide(0.999, entry_id="bad", region="r").serve
    policy.forget(["bad"])
    assert policy.decide(0.95, entry_id="bad", region="r").serve


def test_bounded_config_validates() -> None:
    with pytest.raises(ConfigError, match="`delta`"):
        BoundedErrorConfig(delta=0.0)
    with pytest.raises(ConfigError, match="`explore_rate`"):
        BoundedErrorConfig(explore_rate=0)


def test_bounded_policy_follows_a_growing_cache() -> None:
    """As a cache grows, near neighbours become common: P(s >= t) rises while P(wrong | s >= t) stays put.

    A certificate pooled over the whole history would lag behind and overshoot delta late in the stream;
    the frequency factor comes from recent lookups, so the late false-hit rate stays below delta too.
    """
    delta, n = 0.02, 30_000
    policy = BoundedErrorPolicy(BoundedErrorConfig(delta=delta, seed=7))
    rng = random.Random(8)
    late_lookups = late_wrong = late_hits = 0
    for i in range(n):
        near = rng.random() < 0.02 + 0.3 * i / n  # the share of close candidates grows 16-fold
        s = rng.uniform(0.9, 1.0) if near else rng.uniform(0.3, 0.9)
        wrong = rng.random() < (0.3 if s >= 0.9 else 0.8)
        d = policy.decide(s, entry_id=f"e{i}", region="r")
        if d.verify:
            policy.observe(s, not wrong, entry_id=f"e{i}", region="r", sampled=d.sampled)
        if i >= 3 * n // 4:
            late_lookups += 1
            late_wrong += d.serve and wrong
            late_hits += d.serve
    assert late_hits > 0.01 * late_lookups  # it does serve
    assert late_wrong / late_lookups <= delta
    # late in the stream the true FHR(t) = q * (1 - t) / 0.1 * 0.3 with q ~ 0.3: t must sit near 0.98
    assert policy.threshold("r") >= 0.97
