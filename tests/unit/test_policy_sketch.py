"""The TinyLFU frequency sketch: count-min estimates, doorkeeper, aging."""

from __future__ import annotations

import pytest

from cachelm.errors import ConfigError
from cachelm.policy import FrequencySketch


def test_estimates_never_undercount_before_a_reset() -> None:
    sketch = FrequencySketch(width=256, sample_size=10_000)
    truth = {f"k{i}": (i % 7) + 1 for i in range(100)}
    for key, count in truth.items():
        for _ in range(count):
            sketch.record(key)
    assert all(sketch.estimate(k) >= min(c, 15) for k, c in truth.items())
    # With 100 keys in 256 columns × 4 rows, most estimates are exact.
    exact = sum(sketch.estimate(k) == c for k, c in truth.items())
    assert exact >= 80


def test_doorkeeper_absorbs_first_occurrence() -> None:
    sketch = FrequencySketch(width=1024)
    sketch.record("once")
    assert sketch.estimate("once") == 1
    assert min(row[j] for row in sketch._rows for j in range(len(row))) == 0
    assert sum(map(sum, sketch._rows)) == 0  # counters untouched by a first occurrence
    assert sketch.estimate("never") == 0


def test_aging_halves_counts() -> None:
    sketch = FrequencySketch(width=64, sample_size=40)
    for _ in range(11):
        sketch.record("hot")
    assert sketch.estimate("hot") == 11
    for i in range(29):
        sketch.record(f"cold{i}")
    assert sketch.resets == 1
    assert sketch.estimate("hot") == 5  # counters 10 -> 5, doorkeeper cleared


def test_counters_saturate() -> None:
    sketch = FrequencySketch(width=64, sample_size=1000)
    for _ in range(100):
        sketch.record("k")
    assert sketch.estimate("k") == 16  # 15 in the counters + 1 in the doorkeeper
    wide = FrequencySketch(width=64, sample_size=1000, max_count=255)
    for _ in range(100):
        wide.record("k")
    assert wide.estimate("k") == 100


@pytest.mark.parametrize(
    "kwargs", [{"width": 8}, {"depth": 0}, {"depth": 9}, {"sample_size": 0}, {"max_count": 0}]
)
def test_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        FrequencySketch(**kwargs)
