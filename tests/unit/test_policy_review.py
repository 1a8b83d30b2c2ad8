"""Review findings for the eviction policies: each test failed before its fix."""

from __future__ import annotations

import math
from typing import Any

import pytest

from cachelm.clock import ManualClock
from cachelm.errors import ConfigError
from cachelm.policy import (
    AdaptiveCostPolicy,
    FrequencySketch,
    GDSFPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    TinyLFUPolicy,
    TTLPolicy,
)
from cachelm.store import MemoryStore, Record
from cachelm.store.bounded import BoundedStore

# -- TTL: rewriting a key whose TTL ran out but that nobody collected yet ------------------------------------


def test_ttl_rewrite_of_an_expired_key_does_not_report_it_evicted() -> None:
    clock = ManualClock()
    policy = TTLPolicy(ttl=10, max_entries=5, timer=clock)
    policy.insert("a", 1)
    clock.advance(10)  # `a` expired, not collected yet
    # The contract: a key in the returned list is not tracked afterwards. `a` is tracked (just rewritten).
    assert policy.insert("a", 2) == []
    assert "a" in policy and policy.total_bytes == 2 and policy.deadline("a") == 20


def test_ttl_refused_rewrite_of_an_expired_key_lists_it_once() -> None:
    clock = ManualClock()
    policy = TTLPolicy(ttl=10, max_bytes=5, timer=clock)
    policy.insert("a", 1)
    clock.advance(10)
    assert policy.insert("a", 6) == ["a"]  # expired and refused: one key left the cache once
    assert "a" not in policy and policy.total_bytes == 0


def test_bounded_store_keeps_a_record_rewritten_after_its_ttl_ran_out() -> None:
    """The user-visible failure: the new value was silently never stored."""
    clock = ManualClock()
    store = BoundedStore(MemoryStore(clock=clock), TTLPolicy(ttl=10, max_entries=5, timer=clock))
    store.put(Record(key="a", value=b"old"))
    clock.advance(11)
    store.put(Record(key="a", value=b"new"))
    record = store.get("a")
    assert record is not None and record.value == b"new"


# -- bad configuration: a ConfigError naming the argument, never a TypeError or a silently odd policy --------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_bytes": math.nan}, "`max_bytes`"),  # NaN compared False: the cache never evicted
        ({"max_bytes": math.inf}, "`max_bytes`"),
        ({"max_entries": "3"}, "`max_entries`"),  # was a bare TypeError
        ({"max_entries": 2.5}, "`max_entries`"),
        ({"max_entries": True}, "`max_entries`"),
    ],
)
@pytest.mark.parametrize("cls", [LRUPolicy, LFUPolicy, GDSFPolicy, S3FIFOPolicy, AdaptiveCostPolicy])
def test_bad_capacity_types_raise_config_error(cls: Any, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        cls(**kwargs)


def test_nan_byte_capacity_used_to_make_an_unbounded_cache() -> None:
    try:
        policy = LRUPolicy(max_bytes=math.nan)  # type: ignore[arg-type]
    except ConfigError:
        return
    for i in range(10):
        policy.insert(f"k{i}", 100)
    pytest.fail(f"accepted max_bytes=nan and holds {policy.total_bytes} bytes")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"small_ratio": "0.1"}, "`small_ratio`"),
        ({"small_ratio": None}, "`small_ratio`"),
        ({"move_to_main_threshold": "2"}, "`move_to_main_threshold`"),
        ({"move_to_main_threshold": 1.5}, "`move_to_main_threshold`"),
    ],
)
def test_s3fifo_bad_arguments_raise_config_error(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        S3FIFOPolicy(max_entries=10, **kwargs)


def test_adaptive_nan_window_factor_is_refused() -> None:
    with pytest.raises(ConfigError, match="`window_factor`"):
        AdaptiveCostPolicy(max_entries=10, window_factor=math.nan)


def test_ttl_inner_that_is_not_a_policy_is_named() -> None:
    with pytest.raises(ConfigError, match="`inner` must be a Policy"):
        TTLPolicy("x", ttl=5)  # type: ignore[arg-type]  # was "`inner` must be empty, it tracks 1 keys"
    with pytest.raises(ConfigError, match="`inner` must be a Policy"):
        TTLPolicy(42, ttl=5)  # type: ignore[arg-type]  # was a TypeError from len()


def test_tinylfu_sketch_that_is_not_a_sketch_is_refused() -> None:
    with pytest.raises(ConfigError, match="`sketch`"):
        TinyLFUPolicy(LRUPolicy(max_entries=10), sketch="x")  # type: ignore[arg-type]


def test_sketch_sample_size_bool_is_refused() -> None:
    with pytest.raises(ConfigError, match="`sample_size`"):
        FrequencySketch(sample_size=True)
