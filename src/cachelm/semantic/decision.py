"""Decision rules: given the nearest cached entry and its similarity, serve it or not.

Three rules share one small protocol (`DecisionRule`):

(a) `StaticThreshold`: serve when similarity >= t. GPTCache's default is reproduced by
    ``StaticThreshold.gptcache_default()``: GPTCache keeps ``similarity_threshold = 0.8`` of the range of its
    ``SearchDistanceEvaluation`` (max_distance 4.0) over faiss ``IndexFlatL2`` (squared L2) distances, i.e. a
    hit when ``4 - d >= 0.8 * 4``, ``d <= 0.8``; for unit vectors ``d = 2 - 2 cos``, so cos >= 0.6.
(b) `calibrate_threshold`: a threshold chosen offline on labelled pairs, for the best F1 or for a target
    precision (optionally with a Clopper–Pearson lower confidence bound on that precision).
(c) `BoundedErrorPolicy`: online, error-bounded in the spirit of vCache (arXiv 2502.03771). Statistics below.

The δ-bounded policy
--------------------
The caller sets δ, the largest acceptable *false-hit rate*: the probability that a lookup is answered from
the cache with a wrong answer, ``FHR(t) = P(s >= t and wrong)`` over lookups, for threshold t on the
similarity s of the nearest entry. (Per lookup, as in vCache; 1 − precision is FHR / hit rate.)

Decomposition. ``FHR(t) = P(s >= t) · P(wrong | s >= t)``. The two factors behave differently as the cache
grows: the chance that the nearest entry is very similar, P(s >= t), rises steadily with the number of
entries (measured on QQP: 0.4 % → 12 % at t = 0.95 over a 17k-question stream), while the error rate among
such candidates, P(wrong | s >= t), stays roughly flat or falls. A single pooled estimate of FHR is
therefore stale and too low; the policy estimates each factor from the data that tracks it.

Frequency factor. Every lookup's nearest similarity is known without any verification, so P(s >= t) is
estimated from the most recent `frequency_window` lookups (m(t) of W have s >= t).

Error factor (verification sample). Each lookup is drawn into a *verification sample* with probability
ε_τ that depends only on time τ, never on the lookup: ε_τ = 1 while no threshold is certified (every lookup
is a miss then, and a miss calls the upstream anyway, so verifying it is free), ε afterwards
(`explore_rate`). A sampled lookup with s >= `floor` is verified: the caller compares the upstream answer
with the entry's cached answer and reports ``correct``; if it would have been a hit it is *not* served
(exploration, the only cost of the policy). Because selection is independent of the lookup, the sampled
lookups with s >= t are an i.i.d. draw of all lookups with s >= t, and ``k(t) = #{sampled, s >= t, wrong}``
is Binomial(n(t), P(wrong | s >= t)) with n(t) = #{sampled, s >= t}.

Certification. For candidate t the upper bound is

    U(t) = CP⁺(m(t), W; α/2) · CP⁺(k(t), n(t); α/2),    CP⁺(k, n; a) = Beta⁻¹(1 − a; k + 1, n − k)

(one-sided Clopper–Pearson bounds; by the union bound both hold together with probability >= 1 − α).
Candidates ``t_1 > t_2 > … > t_m`` (a grid down to `floor`) are tested in that fixed order, H_j:
FHR(t_j) > δ rejected when U(t_j) <= δ; testing stops at the first failure and the certified threshold t*
is the last rejected t_j. Fixed-sequence testing controls the family-wise error at α without a
multiplicity correction (Learn-then-Test, Angelopoulos et al. 2021): with probability >= 1 − α every
threshold the policy serves at has FHR <= δ. Bounds are refit after each 1 % of new samples and every
`refit_every` lookups, always from complete (older) data, which keeps them valid.

Per-entry boundaries. Every verified outcome of an entry (sampled or not — misses are verified for
free when the caller does so) updates that entry's own boundary: the highest similarity at which it was
wrong. The entry is served only above ``max(t*, boundary)``. This only ever removes hits, so it cannot raise
the false-hit rate that the certificate bounds; it removes repeat mistakes the global boundary allows. An
entry reported wrong without a pending lookup (e.g. a user complaint) is never served again.

Guarantee, stated honestly: FHR <= δ with probability >= 1 − α, *assuming P(wrong | s >= t) does not rise
over the sample's window, P(s >= t) changes little within `frequency_window` lookups, and the caller's
correctness judgement is right*. Before enough samples exist nothing is certified and no hit is served.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from cachelm.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """What to do with the nearest entry of one lookup.

    serve: answer from the cache. verify: do not serve; call the upstream, compare its answer with the
    entry's cached answer, and report the outcome (`SemanticCache.feedback`). A miss has both False.
    """

    serve: bool
    verify: bool
    rule: str
    threshold: float  # the boundary applied to this entry (nan: none certified yet)
    reason: str  # above-threshold | below-threshold | explore | warmup | entry-veto | no-candidate
    bound: float | None = None  # certified upper bound on FHR at the global threshold (bounded rule)
    sampled: bool = False  # part of the bounded rule's verification sample


@runtime_checkable
class DecisionRule(Protocol):
    """Decides per lookup; learns from verified outcomes (rules that do not learn ignore them)."""

    name: str

    def decide(self, similarity: float | None, *, entry_id: str | None, region: str) -> Decision: ...

    def observe(
        self, similarity: float, correct: bool, *, entry_id: str, region: str, sampled: bool
    ) -> None: ...

    def forget(self, entry_ids: Iterable[str]) -> None: ...


def _check_similarity(similarity: float | None) -> None:
    if similarity is not None and not (isinstance(similarity, float | int) and math.isfinite(similarity)):
        raise ConfigError(f"`similarity` must be a finite number or None, got {similarity!r}")


class StaticThreshold:
    """(a) Serve when similarity >= `threshold`. Learns nothing."""

    name = "static"

    def __init__(self, threshold: float) -> None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, float | int)
            or not -1.0 <= threshold <= 1.0
        ):
            raise ConfigError(f"`threshold` must be a number in [-1, 1], got {threshold!r}")
        self.threshold = float(threshold)

    @classmethod
    def gptcache_default(cls) -> StaticThreshold:
        """GPTCache's default hit rule on unit vectors: cosine >= 0.6 (see the module docstring)."""
        max_distance, similarity_threshold = 4.0, 0.8
        max_squared_l2 = max_distance - max_distance * similarity_threshold  # 0.8
        return cls(1.0 - max_squared_l2 / 2.0)

    def decide(self, similarity: float | None, *, entry_id: str | None, region: str) -> Decision:
        _check_similarity(similarity)
        if similarity is None:
            return Decision(
                serve=False, verify=False, rule=self.name, threshold=self.threshold, reason="no-candidate"
            )
        serve = similarity >= self.threshold
        return Decision(
            serve=serve,
            verify=False,
            rule=self.name,
            threshold=self.threshold,
            reason="above-threshold" if serve else "below-threshold",
        )

    def observe(self, similarity: float, correct: bool, *, entry_id: str, region: str, sampled: bool) -> None:
        """A static rule does not learn."""

    def forget(self, entry_ids: Iterable[str]) -> None:
        """Nothing per entry to forget."""


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Result of `calibrate_threshold` on the calibration split."""

    threshold: float
    objective: str
    precision: float
    recall: float
    f1: float
    num_pairs: int


def clopper_pearson_upper(k: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided (1 − alpha) upper bound on a binomial rate: Beta⁻¹(1 − α; k + 1, n − k); 1 if k = n."""
    from scipy.special import betaincinv  # type: ignore[import-untyped,unused-ignore]

    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        upper = betaincinv(k_arr + 1.0, np.maximum(n_arr - k_arr, 1e-12), 1.0 - alpha)
    return np.where((k_arr >= n_arr) | (n_arr <= 0), 1.0, upper)


def clopper_pearson_lower(k: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided (1 − alpha) lower bound on a binomial proportion; 0 when k = 0."""
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    return 1.0 - clopper_pearson_upper(n_arr - k_arr, n_arr, alpha)


def threshold_curve(similarities: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """For every distinct score t (descending): tp, fp, fn at "predict positive when s >= t"."""
    s = np.asarray(similarities, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # keep the last row of each tie group
    return {"threshold": s_sorted[last], "tp": tp[last], "fp": fp[last], "fn": y.sum() - tp[last]}


def calibrate_threshold(
    similarities: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    objective: str = "f1",
    target_precision: float = 0.95,
    alpha: float | None = None,
) -> Calibration:
    """(b) Threshold from labelled pairs (label 1 = same answer).

    objective "f1": the threshold with the best F1. objective "precision": the lowest threshold whose
    precision is >= `target_precision` (with `alpha`, whose Clopper–Pearson lower bound at level 1 − alpha
    is); the highest-recall such threshold.
    """
    try:
        s = np.asarray(similarities, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("`similarities` must be numbers") from None
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape or s.size == 0:
        raise ConfigError(
            f"`similarities` and `labels` must be equal-length 1-D arrays, got {s.shape}, {y.shape}"
        )
    if not np.all(np.isfinite(s)):  # a NaN sorts last and would be calibrated as the lowest score
        raise ConfigError("`similarities` must be finite (NaN or infinity found)")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ConfigError("`labels` must be 0 or 1")
    if objective not in ("f1", "precision"):
        raise ConfigError(f"`objective` must be 'f1' or 'precision', got {objective!r}")
    if isinstance(target_precision, bool) or not isinstance(target_precision, float | int):
        raise ConfigError(f"`target_precision` must be a number in (0, 1), got {target_precision!r}")
    if not 0 < target_precision < 1:
        raise ConfigError(f"`target_precision` must be in (0, 1), got {target_precision!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, float | int) or not 0 < alpha < 1
    ):
        raise ConfigError(f"`alpha` must be None or a number in (0, 1), got {alpha!r}")
    c = threshold_curve(s, y)
    tp, fp, fn = c["tp"].astype(float), c["fp"].astype(float), c["fn"].astype(float)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / np.maximum(tp + fn, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if objective == "f1":
        best = int(np.argmax(f1))
    else:
        ok_precision = precision if alpha is None else clopper_pearson_lower(tp, tp + fp, alpha)
        ok = np.flatnonzero(ok_precision >= target_precision)
        if ok.size == 0:
            raise ConfigError(f"no threshold reaches precision {target_precision} on these pairs")
        best = int(ok[np.argmax(recall[ok])])
    return Calibration(
        threshold=float(c["threshold"][best]),
        objective=objective,
        precision=float(precision[best]),
        recall=float(recall[best]),
        f1=float(f1[best]),
        num_pairs=int(s.size),
    )


@dataclass(frozen=True, kw_only=True)
class PairScores:
    """How a threshold does on labelled pairs; rates are over all pairs."""

    precision: float
    recall: float
    f1: float
    hit_rate: float
    false_hit_rate: float


def pair_scores(similarities: np.ndarray, labels: np.ndarray, threshold: float) -> PairScores:
    """Scores of "predict a hit when similarity >= `threshold`" on labelled pairs (label 1 = same answer)."""
    y = labels.astype(bool)
    hit = similarities >= threshold
    tp, fp, fn = int((hit & y).sum()), int((hit & ~y).sum()), int((~hit & y).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PairScores(
        precision=precision, recall=recall, f1=f1, hit_rate=float(hit.mean()), false_hit_rate=fp / len(y)
    )


@dataclass
class _Region:
    """One certificate's data; every ``*_at[j]`` counts values >= grid[j], kept incrementally (O(grid))."""

    samples: deque[tuple[float, bool]]  # verified (similarity, wrong), arrival order
    recent: deque[float]  # nearest similarity of the latest lookups (-inf: no candidate)
    sampled_at: np.ndarray  # n(t)
    wrong_at: np.ndarray  # k(t)
    recent_at: np.ndarray  # m(t)
    threshold: float = math.nan
    bound: float | None = None
    new_samples: int = 0
    new_lookups: int = 0


@dataclass(frozen=True, kw_only=True)
class BoundedErrorConfig:
    """Settings of `BoundedErrorPolicy`; see the module docstring for what each means."""

    delta: float = 0.02  # max false-hit rate per lookup
    alpha: float = 0.05  # 1 − confidence of the certificate
    explore_rate: float = 0.1  # ε once a threshold is certified
    floor: float = 0.5  # lowest candidate threshold
    grid_step: float = 0.005
    window: int = 20_000  # most recent verification samples used for P(wrong | s >= t)
    frequency_window: int = 1000  # most recent lookups used for P(s >= t)
    refit_every: int = 20  # lookups between refits of the bound
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("delta", "alpha", "explore_rate", "floor", "grid_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, float | int):
                raise ConfigError(f"`{name}` must be a number, got {value!r}")
        for name in ("window", "frequency_window", "refit_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"`{name}` must be an int, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"`seed` must be an int or None, got {self.seed!r}")
        checks = {
            "delta": 0 < self.delta < 1,
            "alpha": 0 < self.alpha < 1,
            "explore_rate": 0 < self.explore_rate <= 1,
            "grid_step": 0 < self.grid_step < 0.5,
            # The grid starts at 1 - grid_step: a floor above it leaves no threshold to certify, ever.
            "floor": -1 <= self.floor <= 1 - self.grid_step,
            "window": self.window >= 10,
            # An empty lookup window never refits: the policy would silently never serve.
            "frequency_window": self.frequency_window >= 1,
            "refit_every": self.refit_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"`{name}` is out of range: {getattr(self, name)!r}")


@dataclass
class BoundedErrorStats:
    decisions: int = 0
    served: int = 0
    explored: int = 0
    verifications: int = 0
    samples: int = 0
    entry_vetoes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class BoundedErrorPolicy:
    """(c) Serve only while the certified false-hit rate stays <= δ; learns from verified outcomes.

    Regions are independent certificates (the facade uses one per tenant). Thread-safe.
    """

    name = "bounded"

    def __init__(self, config: BoundedErrorConfig | None = None) -> None:
        self.config = config or BoundedErrorConfig()
        if not isinstance(self.config, BoundedErrorConfig):
            raise ConfigError(f"`config` must be a BoundedErrorConfig, got {type(self.config).__name__}")
        c = self.config
        self._grid = np.arange(1.0 - c.grid_step, c.floor - 1e-9, -c.grid_step)  # descending
        self._regions: dict[str, _Region] = {}
        self._entry_boundary: dict[str, float] = {}
        self._rng = random.Random(c.seed)
        self._lock = threading.Lock()
        self.stats = BoundedErrorStats()

    @property
    def delta(self) -> float:
        return self.config.delta

    def _region(self, region: str) -> _Region:
        r = self._regions.get(region)
        if r is None:
            zeros = np.zeros(self._grid.size, np.int64)
            r = self._regions[region] = _Region(
                samples=deque(),
                recent=deque(),
                sampled_at=zeros.copy(),
                wrong_at=zeros.copy(),
                recent_at=zeros.copy(),
            )
        return r

    def _add_lookup(self, r: _Region, similarity: float) -> None:
        r.recent.append(similarity)
        r.recent_at[self._grid <= similarity] += 1
        if len(r.recent) > self.config.frequency_window:
            r.recent_at[self._grid <= r.recent.popleft()] -= 1
        r.new_lookups += 1

    def _add_sample(self, r: _Region, similarity: float, wrong: bool) -> None:
        r.samples.append((similarity, wrong))
        above = self._grid <= similarity
        r.sampled_at[above] += 1
        r.wrong_at[above] += wrong
        if len(r.samples) > self.config.window:  # slide: the oldest sample leaves the counts
            old_similarity, old_wrong = r.samples.popleft()
            above = self._grid <= old_similarity
            r.sampled_at[above] -= 1
            r.wrong_at[above] -= old_wrong
        r.new_samples += 1
        self.stats.samples += 1

    def threshold(self, region: str) -> float:
        """The certified threshold t* of `region` (nan while none is certified)."""
        with self._lock:
            return self._refit(self._region(region)).threshold

    def decide(self, similarity: float | None, *, entry_id: str | None, region: str) -> Decision:
        _check_similarity(similarity)
        with self._lock:
            r = self._refit(self._region(region))
            self.stats.decisions += 1
            certified = not math.isnan(r.threshold)
            sampled = self._rng.random() < (self.config.explore_rate if certified else 1.0)
            self._add_lookup(r, -math.inf if similarity is None else float(similarity))
            if similarity is None or similarity < self.config.floor:
                # Cannot be a wrong hit at any candidate threshold: nothing to verify.
                return Decision(
                    serve=False,
                    verify=False,
                    rule=self.name,
                    threshold=r.threshold,
                    reason="no-candidate" if similarity is None else "below-threshold",
                    bound=r.bound,
                    sampled=sampled,
                )
            boundary = max(r.threshold, self._entry_boundary.get(entry_id or "", -math.inf))
            above = certified and similarity >= boundary
            vetoed = certified and similarity >= r.threshold and not above
            if above and not sampled:
                self.stats.served += 1
                return Decision(
                    serve=True,
                    verify=False,
                    rule=self.name,
                    threshold=boundary,
                    reason="above-threshold",
                    bound=r.bound,
                    sampled=False,
                )
            if above:
                self.stats.explored += 1
            self.stats.verifications += 1
            self.stats.entry_vetoes += vetoed
            if above:
                reason = "explore"
            elif vetoed:
                reason = "entry-veto"
            else:
                reason = "below-threshold" if certified else "warmup"
            # Every miss with a candidate is verified: free (the upstream is called anyway) and it teaches
            # the entry's own boundary; only `sampled` outcomes enter the certificate.
            return Decision(
                serve=False,
                verify=True,
                rule=self.name,
                threshold=boundary,
                reason=reason,
                bound=r.bound,
                sampled=sampled,
            )

    def observe(self, similarity: float, correct: bool, *, entry_id: str, region: str, sampled: bool) -> None:
        """A verified outcome of a lookup that `decide` asked to verify (with that decision's `sampled`)."""
        _check_similarity(similarity)
        with self._lock:
            if not correct:
                old = self._entry_boundary.get(entry_id, -math.inf)
                # Wrong at this similarity, so (monotonicity) at any lower one too: serve above it only.
                self._entry_boundary[entry_id] = max(old, math.nextafter(float(similarity), math.inf))
            if sampled:
                self._add_sample(self._region(region), float(similarity), not correct)

    def veto(self, entry_id: str) -> None:
        """Never serve `entry_id` again (a wrong answer reported outside a verification)."""
        with self._lock:
            self._entry_boundary[entry_id] = math.inf

    def forget(self, entry_ids: Iterable[str]) -> None:
        with self._lock:
            for entry_id in entry_ids:
                self._entry_boundary.pop(entry_id, None)

    def _refit(self, r: _Region) -> _Region:
        """Recompute t* by fixed-sequence testing down the grid (see the module docstring)."""
        n = len(r.samples)
        due = r.new_samples >= max(1, n // 100) or r.new_lookups >= self.config.refit_every
        if not due or not r.recent:
            return r
        r.new_samples = r.new_lookups = 0
        half = self.config.alpha / 2
        frequency = clopper_pearson_upper(r.recent_at, len(r.recent), half)
        error = clopper_pearson_upper(r.wrong_at, r.sampled_at, half)
        upper = frequency * error
        failed = np.flatnonzero(upper > self.config.delta)
        last_ok = (failed[0] if failed.size else self._grid.size) - 1
        if last_ok < 0:
            r.threshold, r.bound = math.nan, None
        else:
            r.threshold, r.bound = float(self._grid[last_ok]), float(upper[last_ok])
        return r
