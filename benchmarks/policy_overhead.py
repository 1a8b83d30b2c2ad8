"""Per-access overhead of every eviction policy: P50 / P99 of one request (a hit's access, a miss's insert).

A Zipf(0.9) trace of 20,000 keys (sizes and costs as in `cachelm.sim.synthetic`) is replayed through each
policy with a byte capacity of 10% of the working set, the way `BoundedStore` and the simulator drive it:
`key in policy`, then `access` on a hit or `insert` on a miss. Each request is timed on its own with
`time.perf_counter_ns` (garbage collection off); the clock's own cost, measured on an empty timed call, is
reported alongside and not subtracted. Policies are measured in interleaved chunks so a noisy neighbour slows
all of them alike.

Target (issue 7): per-access policy overhead ≤ 5 µs P50.

    .venv/bin/python benchmarks/policy_overhead.py            # 200,000 requests per policy, writes the docs
    .venv/bin/python benchmarks/policy_overhead.py --quick    # 20,000, does not write the docs

Writes docs/BENCHMARKS.md (section ``policy_overhead``) and docs/img/policy_overhead.png.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report
from cachelm.policy.base import Policy
from cachelm.sim import SimClock, zipf_trace
from cachelm.sim.policies import policy_factories

CHUNKS = 10
TARGET_US = 5.0


def _quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] / 1000.0


def measure(n_requests: int) -> tuple[dict[str, dict[str, list[int]]], float, int]:
    trace = zipf_trace(n_requests=n_requests, seed=0)
    working_set = trace.unique_bytes()
    factories = policy_factories(working_set / trace.unique_keys())
    capacity = working_set // 10
    policies: dict[str, Policy] = {name: make(capacity, SimClock()) for name, make in factories.items()}
    samples: dict[str, dict[str, list[int]]] = {name: {"hit": [], "miss": []} for name in policies}
    requests = list(trace)
    chunk = -(-len(requests) // CHUNKS)
    perf = time.perf_counter_ns
    gc.disable()
    try:
        for start in range(0, len(requests), chunk):
            part = requests[start : start + chunk]
            for name, policy in policies.items():
                hit_ns, miss_ns = samples[name]["hit"], samples[name]["miss"]
                contains, access, insert = policy.__contains__, policy.access, policy.insert
                for r in part:
                    t0 = perf()
                    if contains(r.key):
                        access(r.key)
                        hit_ns.append(perf() - t0)
                    else:
                        insert(r.key, r.size, r.cost)
                        miss_ns.append(perf() - t0)
        empty = []
        for _ in range(100_000):
            t0 = perf()
            empty.append(perf() - t0)
    finally:
        gc.enable()
    return samples, statistics.median(empty) / 1000.0, capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 requests; does not write the docs")
    args = parser.parse_args()
    n = 20_000 if args.quick else 200_000
    samples, clock_us, capacity = measure(n)

    lines = [
        "| policy | P50 per request (µs) | P99 (µs) | P50 hit / access (µs) | P50 miss / insert (µs) "
        f"| hit ratio | ≤ {TARGET_US:g} µs P50 |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    rows = []
    for name, parts in samples.items():
        both = parts["hit"] + parts["miss"]
        p50, p99 = _quantile(both, 0.5), _quantile(both, 0.99)
        rows.append((name, p50, p99))
        lines.append(
            f"| {name} | {p50:.2f} | {p99:.2f} | {_quantile(parts['hit'], 0.5):.2f} | "
            f"{_quantile(parts['miss'], 0.5):.2f} | {len(parts['hit']) / len(both):.3f} | "
            f"{'yes' if p50 <= TARGET_US else '**no**'} |"
        )
    markdown = "\n".join(
        [
            "## Policy overhead (per request)",
            "",
            "Command: `.venv/bin/python benchmarks/policy_overhead.py`. "
            f"Machine: {_report.machine_description()} "
            "(2-core CI-class VM, shared with other jobs: absolute numbers are pessimistic). "
            f"{n:,} requests of a Zipf(0.9) trace over 20,000 keys per policy, byte capacity 10% of the "
            f"working set ({capacity / 1e6:.1f} MB); each request (`in` + `access` on a hit, `in` + `insert` "
            f"on a miss, evictions included) timed alone; the timer itself costs {clock_us:.2f} µs "
            "(not subtracted).",
            "",
            *lines,
            "",
            "![policy overhead](img/policy_overhead.png)",
        ]
    )
    print(markdown)
    if not args.quick:
        _plot(rows, _report.DOCS_IMG / "policy_overhead.png")
        _report.write_section("policy_overhead", markdown)


def _plot(rows: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    names = [r[0] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="P50")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="P99")
    ax.axhline(TARGET_US, color="red", linestyle="--", label=f"target P50 ≤ {TARGET_US:g} µs")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("µs per request")
    ax.set_title("Policy overhead per request (Zipf 0.9, capacity 10% of working set)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _report.save_figure(fig, path)


if __name__ == "__main__":
    main()
