"""The trace simulator and the trace builders (on small hand-made data; no dependency on shared data)."""

from __future__ import annotations

import importlib
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from cachelm.errors import ConfigError
from cachelm.policy import LRUPolicy, TTLPolicy
from cachelm.sim import (
    PrefillModel,
    Pricing,
    Request,
    SimClock,
    Trace,
    chat_kv_trace,
    chat_response_trace,
    compare,
    load_conversations,
    qqp_trace,
    scan_trace,
    shifting_trace,
    simulate,
    zipf_trace,
)
from cachelm.sim.policies import BASELINES, policy_factories


def trace_of(*items: tuple[str, int, float], chain: list[int] | None = None) -> Trace:
    chains = chain or [-1] * len(items)
    requests = [
        Request(key=k, size=s, cost=c, time=float(i), chain=chains[i]) for i, (k, s, c) in enumerate(items)
    ]
    return Trace(name="hand", requests=requests, cost_unit="USD")


def test_simulate_counts_hits_bytes_and_cost_exactly() -> None:
    trace = trace_of(
        ("a", 10, 1.0), ("b", 10, 5.0), ("a", 10, 1.0), ("c", 10, 2.0), ("b", 10, 5.0), ("a", 10, 1.0)
    )
    result = simulate(trace, LRUPolicy(max_bytes=20))
    # a miss, b miss, a hit, c miss (evicts b), b miss (evicts a), a miss
    assert result.hits == 1 and result.requests == 6
    assert result.hit_ratio == pytest.approx(1 / 6)
    assert result.byte_hit_ratio == pytest.approx(10 / 60)
    assert result.saved_compute == pytest.approx(1.0 / 15.0)
    assert result.evictions == 3


def test_broken_prefix_chain_counts_later_blocks_as_misses() -> None:
    items = [("p0", 1, 1.0), ("p1", 1, 1.0), ("p2", 1, 1.0)] * 2
    trace = trace_of(*items, chain=[0, 0, 0, 1, 1, 1])
    policy = LRUPolicy(max_entries=3)
    result = simulate(trace, policy)
    assert result.hits == 3
    policy2 = LRUPolicy(max_entries=3)
    trace2 = trace_of(*items, ("p0", 1, 1.0), chain=[0, 0, 0, 1, 1, 1, 2])
    simulate(trace2, policy2)
    policy2.remove("p0")  # the parent is gone: a chain that starts with it hits nothing
    again = trace_of(("p0", 1, 1.0), ("p1", 1, 1.0), ("p2", 1, 1.0), chain=[5, 5, 5])
    assert simulate(again, policy2).hits == 0


def test_sim_clock_drives_ttl() -> None:
    trace = Trace(
        name="t",
        cost_unit="USD",
        requests=[Request(key="a", size=1, cost=1.0, time=t) for t in (0.0, 5.0, 20.0, 21.0)],
    )
    clock = SimClock()
    result = simulate(trace, TTLPolicy(ttl=10, timer=clock), clock=clock)
    assert result.hits == 2  # t=5 hits; t=20 finds it expired (a miss that re-inserts); t=21 hits
    assert clock() == 21.0


def test_trace_summary_is_the_infinite_cache_bound() -> None:
    trace = trace_of(("a", 10, 1.0), ("a", 10, 1.0), ("b", 30, 3.0))
    summary = trace.summary()
    assert summary["keys"] == 2 and summary["unique_bytes"] == 40
    assert summary["max_hit_ratio"] == pytest.approx(1 / 3)
    assert summary["max_cost_hit_ratio"] == pytest.approx(1 / 5)
    unbounded = simulate(trace, LRUPolicy())
    assert unbounded.saved_compute == pytest.approx(summary["max_cost_hit_ratio"])


def test_compare_runs_every_policy_at_every_capacity() -> None:
    trace = zipf_trace(n_keys=200, n_requests=3000, seed=1)
    factories = policy_factories(trace.unique_bytes() / trace.unique_keys())
    assert set(BASELINES) <= set(factories)
    caps = [trace.unique_bytes() // 20, trace.unique_bytes() // 5]
    results = compare(trace, factories, caps)
    assert len(results) == len(factories) * 2
    for result in results:
        assert 0.0 < result.saved_compute <= trace.summary()["max_cost_hit_ratio"] + 1e-12
    by_cap = {(r.policy, r.capacity_bytes): r.saved_compute for r in results}
    assert by_cap[("LRU", caps[1])] >= by_cap[("LRU", caps[0])]  # more room never hurts LRU (a stack policy)


def test_synthetic_traces_are_seeded_and_shaped() -> None:
    a, b = zipf_trace(n_keys=100, n_requests=2000, seed=3), zipf_trace(n_keys=100, n_requests=2000, seed=3)
    assert [r.key for r in a] == [r.key for r in b]
    counts = Counter(r.key for r in a).most_common()
    assert counts[0][1] > 5 * counts[-1][1]  # Zipf: the head is far hotter than the tail
    scan = scan_trace(n_keys=100, n_requests=3000, scan_every=500, scan_length=200, seed=0)
    scans = [r.key for r in scan if r.key.startswith("scan")]
    assert len(scans) == len(set(scans)) > 0  # scan keys never repeat
    shift = shifting_trace(n_keys=100, n_requests=4000, phases=2, overlap=0.0, seed=0)
    first, second = {r.key for r in shift.requests[:2000]}, {r.key for r in shift.requests[2000:]}
    assert not first & second
    assert all(r.time <= s.time for r, s in zip(a.requests, a.requests[1:], strict=False))
    with pytest.raises(ConfigError, match="`alpha`"):
        zipf_trace(alpha=0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    chat = tmp_path / "chat"
    chat.mkdir()
    dialogues = [
        {
            "task": "GR",
            "id": i,
            "history": [{"user": f"q{i}.{t} " * 8, "bot": f"a{i}.{t} " * (5 + t)} for t in range(3)],
        }
        for i in range(6)
    ]
    (chat / "mtbench101.jsonl").write_text("\n".join(json.dumps(d) for d in dialogues))
    questions = [
        {"question_id": 81 + i, "category": "writing", "turns": [f"w{i} " * 10, "shorter"]} for i in range(2)
    ]
    (chat / "mt_bench_question.jsonl").write_text("\n".join(json.dumps(q) for q in questions))
    qqp = tmp_path / "qqp"
    qqp.mkdir()
    pairs = [
        {"text_a": "How do I learn Python?", "text_b": "What is the best way to learn Python?", "label": 1},
        {
            "text_a": "What is the best way to learn Python?",
            "text_b": "How to learn Python fast?",
            "label": 1,
        },
        {"text_a": "Why is the sky blue?", "text_b": "How do I learn Python?", "label": 0},
    ]
    (qqp / "gptcache_similiar_qqp_full.json").write_text(json.dumps(pairs))
    return tmp_path


def test_conversations_load_with_answer_lengths_for_mt_bench(data_dir: Path) -> None:
    convs = load_conversations(data_dir)
    assert len(convs) == 8 and sum(len(c.turns) for c in convs) == 22
    mtb = [c for c in convs if c.id.startswith("mtb-")]
    lengths = {len(a.encode()) for c in convs if c.id.startswith("mtb101") for _, a in c.turns}
    assert all(len(a.encode()) in lengths for c in mtb for _, a in c.turns)
    with pytest.raises(ConfigError, match="chat data"):
        load_conversations(data_dir / "missing")


def test_chat_response_trace_structure(data_dir: Path) -> None:
    trace = chat_response_trace(data_dir, n_sessions=300, p_continue=1.0, seed=2)
    pricing = Pricing()
    assert len(trace) == sum(1 for _ in trace)
    by_key: dict[str, tuple[int, float]] = {}
    for r in trace:
        assert by_key.setdefault(r.key, (r.size, r.cost)) == (r.size, r.cost)  # one size/cost per key
    # p_continue=1: every session walks its whole dialogue, so there are at most (8 convs x turns x 3 tenants)
    assert trace.unique_keys() <= 22 * 3 and trace.summary()["max_hit_ratio"] > 0.8
    # Cost follows the price formula: an answer of `size` bytes and a prompt at least as long as a question.
    assert all(r.cost >= pricing.cost(1, r.size) for r in trace)
    times = [r.time for r in trace]
    assert times == sorted(times)


def test_chat_kv_trace_prompts_share_prefix_blocks(data_dir: Path) -> None:
    prefill = PrefillModel(flops_per_token=1e9, attn_flops_per_context_token=0.0)
    trace = chat_kv_trace(data_dir, n_sessions=50, p_continue=1.0, block_tokens=4, prefill=prefill, seed=1)
    chains: dict[int, list[str]] = {}
    for r in trace:
        chains.setdefault(r.chain, []).append(r.key)
        assert r.size == 4 * 23_040 and r.cost == pytest.approx(4.0)  # 4 tokens x 1 GFLOP
    deeper = PrefillModel()
    assert deeper.gflops(1024, 16) > deeper.gflops(0, 16) > 16 * 0.2
    turns = list(chains.values())
    # Every prompt of one tenant starts with the same system-prompt blocks.
    first_blocks = Counter(c[0] for c in turns)
    assert len(first_blocks) <= 3
    # Within a session the next turn's prompt extends the previous one: its blocks start with them.
    assert any(a != b and b[: len(a) - 1] == a[:-1] for a, b in itertools.pairwise(turns))


def test_qqp_trace_maps_paraphrases_to_one_key(data_dir: Path) -> None:
    trace = qqp_trace(data_dir, n_requests=500, seed=0)
    assert trace.unique_keys() <= 2  # {learn python x3} and {sky}
    assert trace.summary()["max_hit_ratio"] > 0.9


def test_request_validation() -> None:
    with pytest.raises(ConfigError, match="`size`"):
        Request(key="a", size=-1, cost=1.0)
    with pytest.raises(ConfigError, match="`cost`"):
        Request(key="a", size=1, cost=float("nan"))
    with pytest.raises(ConfigError, match="no requests"):
        Trace(name="x", requests=[], cost_unit="USD")


@pytest.mark.parametrize("name", ["cachelm.policy", "cachelm.sim"])
def test_all_is_sorted_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    assert all(hasattr(module, attr) for attr in exported)
