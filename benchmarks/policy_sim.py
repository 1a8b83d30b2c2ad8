"""Eviction policies compared by trace simulation, side by side, on chat-derived and synthetic traces.

Traces (see `cachelm.sim` for how each is derived and documented):

- chat-response: exact response-cache lookups of sessions derived from MT-Bench-101 + MT-Bench (cost: USD);
- chat-kv: the prompt KV blocks of such sessions, looked up as prefix chains (cost: prefill GFLOP);
- qqp-semantic: semantic-cache lookups over QQP paraphrase clusters (cost: USD);
- zipf, scan, shift: synthetic Zipf, Zipf + one-hit scans, and shifting popularity (cost: USD).

Policies: LRU, LFU, S3-FIFO, GDSF, TTL(1h) over LRU, the adaptive cost-aware policy, and TinyLFU admission
in front of LRU, S3-FIFO, GDSF and the adaptive policy (with a fixed 1% window, and for the adaptive policy
also with the window sized by W-TinyLFU's hill climber: "+TinyLFU(climb)"). Capacities are fractions of
each trace's working set (the bytes needed to hold every distinct key once). Metric of record: saved
compute = recompute cost of the hits / recompute cost of all requests.

Target (issue 7): the adaptive policy's saved compute ≥ the best of LRU, LFU, S3-FIFO and GDSF on the
chat-derived traces (chat-response, chat-kv) at all three capacities.

    .venv/bin/python benchmarks/policy_sim.py --data ../shared/data            # full run, writes the docs
    .venv/bin/python benchmarks/policy_sim.py --data ../shared/data --quick    # smaller traces, no docs

Writes docs/BENCHMARKS.md (section ``policy_sim``) and docs/img/policy_sim.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report
from cachelm.sim import (
    SimResult,
    Trace,
    chat_kv_trace,
    chat_response_trace,
    compare,
    qqp_trace,
    scan_trace,
    shifting_trace,
    zipf_trace,
)
from cachelm.sim.policies import BASELINES, policy_factories

CHAT_TRACES = ("chat-response", "chat-kv")
LEARNED = "Adaptive"


def build_traces(data: Path, quick: bool, seed: int = 0, chat_only: bool = False) -> list[Trace]:
    scale = 0.25 if quick else 1.0
    n = int(200_000 * scale)
    builders: list[Callable[[], Trace]] = [
        lambda: chat_response_trace(data, n_sessions=int(30_000 * scale), seed=seed),
        lambda: chat_kv_trace(data, n_sessions=int(6_000 * scale), seed=seed),
    ]
    if not chat_only:
        builders += [
            lambda: qqp_trace(data, n_requests=int(100_000 * scale), seed=seed),
            lambda: zipf_trace(n_requests=n, seed=seed),
            lambda: scan_trace(n_requests=n, seed=seed),
            lambda: shifting_trace(n_requests=n, seed=seed),
        ]
    return [build() for build in builders]


def run(traces: list[Trace], fractions: list[float]) -> dict[str, list[SimResult]]:
    out: dict[str, list[SimResult]] = {}
    for trace in traces:
        start = time.perf_counter()
        working_set = trace.unique_bytes()
        factories = policy_factories(working_set / trace.unique_keys())
        capacities = [max(int(working_set * f), 1) for f in fractions]
        out[trace.name] = compare(trace, factories, capacities)
        print(f"{trace.name}: {len(trace):,} requests, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def _cell(r: SimResult) -> str:
    return f"{r.saved_compute:.4f} / {r.hit_ratio:.3f} / {r.byte_hit_ratio:.3f}"


def trace_table(trace: Trace, results: list[SimResult], fractions: list[float]) -> str:
    caps = sorted({r.capacity_bytes or 0 for r in results})
    names = list(dict.fromkeys(r.policy for r in results))
    by = {(r.policy, r.capacity_bytes): r for r in results}
    best = {cap: max(by[(n, cap)].saved_compute for n in names) for cap in caps}
    s = trace.summary()
    head = (
        f"**{trace.name}** — {trace.description}; {s['keys']:,.0f} distinct keys, working set "
        f"{s['unique_bytes'] / 1e6:,.1f} MB; cost in {trace.cost_unit}; an infinite cache would save "
        f"{s['max_cost_hit_ratio']:.3f}.\n\n"
    )
    cols = [f"{f:.0%} of working set" for f in fractions]
    lines = [
        "| policy | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name in names:
        cells = []
        for cap in caps:
            r = by[(name, cap)]
            text = _cell(r)
            cells.append(f"**{text}**" if r.saved_compute == best[cap] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def target_table(per_seed: dict[int, dict[str, list[SimResult]]], fractions: list[float]) -> tuple[str, bool]:
    """Adaptive vs the best baseline on the chat traces, for every seed; met = met on every seed."""
    seeds = sorted(per_seed)
    lines = [
        f"| trace | capacity | seed | {LEARNED} | best of {', '.join(BASELINES)} | margin | met |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    all_met = True
    for name in CHAT_TRACES:
        for i, fraction in enumerate(fractions):
            margins = []
            for seed in seeds:
                rows = per_seed[seed][name]
                cap = sorted({r.capacity_bytes or 0 for r in rows})[i]
                at = {r.policy: r.saved_compute for r in rows if r.capacity_bytes == cap}
                base = max(BASELINES, key=lambda b: at[b])
                margin = at[LEARNED] - at[base]
                margins.append(margin)
                lines.append(
                    f"| {name} | {fraction:.0%} | {seed} | {at[LEARNED]:.4f} | {at[base]:.4f} ({base}) | "
                    f"{margin:+.4f} | {'yes' if margin >= 0 else '**no**'} |"
                )
            met = sum(m >= 0 for m in margins)
            all_met &= met == len(margins)
            lines.append(
                f"| {name} | {fraction:.0%} | mean | | | {sum(margins) / len(margins):+.4f} | "
                f"{met}/{len(margins)} seeds |"
            )
    return "\n".join(lines), all_met


def plot(
    traces: list[Trace], results: dict[str, list[SimResult]], fractions: list[float], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9), sharey=False)
    for ax, trace in zip(axes.flat, traces, strict=False):
        rows = results[trace.name]
        names = list(dict.fromkeys(r.policy for r in rows))
        caps = sorted({r.capacity_bytes or 0 for r in rows})
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [
                next(r.saved_compute for r in rows if r.policy == name and r.capacity_bytes == c)
                for c in caps
            ]
            xs = [j + i * width for j in range(len(caps))]
            color = plt.get_cmap("tab20")(i)  # more policies than the default cycle's 10 colours
            ax.bar(xs, values, width, label=name, color=color, edgecolor="black" if name == LEARNED else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(caps))], [f"{f:.0%}" for f in fractions])
        ax.set_title(f"{trace.name} (cost: {trace.cost_unit})")
        ax.set_xlabel("capacity (share of working set)")
        ax.set_ylabel("saved compute (cost hit ratio)")
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Eviction policies by trace simulation: saved compute")
    _report.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=_report.REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--capacities", default="0.01,0.05,0.2", help="fractions of the working set")
    parser.add_argument("--quick", action="store_true", help="traces at 1/4 size; does not write the docs")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the chat traces (tables show the first)")
    args = parser.parse_args()
    if not (args.data / "chat" / "mtbench101.jsonl").exists():
        parser.error(f"--data {str(args.data)!r} does not hold chat/mtbench101.jsonl")
    fractions = [float(f) for f in args.capacities.split(",")]
    if len(fractions) < 1 or any(not 0 < f <= 1 for f in fractions):
        parser.error(f"--capacities must be fractions in (0, 1], got {args.capacities!r}")

    seeds = [int(x) for x in args.seeds.split(",")]
    start = time.perf_counter()
    traces = build_traces(args.data, args.quick, seed=seeds[0])
    results = run(traces, fractions)
    per_seed = {seeds[0]: results}
    for seed in seeds[1:]:
        per_seed[seed] = run(build_traces(args.data, args.quick, seed=seed, chat_only=True), fractions)
    elapsed = time.perf_counter() - start

    target, met = target_table(per_seed, fractions)
    parts = [
        "## Eviction policies (trace simulation)",
        "",
        f"Command: `.venv/bin/python benchmarks/policy_sim.py --data ../shared/data` ({elapsed:.0f} s). "
        f"Machine: {_report.machine_description()} (2-core CI-class VM, shared; simulation results do not "
        "depend on it). Each cell: **saved compute** (cost-weighted hit ratio) / hit ratio / byte hit ratio; "
        "bold = best saved compute at that capacity. Every run replays the trace through the real policy "
        "classes of `cachelm.policy` (`cachelm.sim.simulate`); traces are derived as documented in "
        f"`cachelm.sim.chat` and `cachelm.sim.synthetic`. Tables below: seed {seeds[0]}; the target is "
        f"checked on the chat traces for seeds {args.seeds}. The adaptive policy runs with its defaults "
        "(`sample_rate` 1/8, `window_factor` 32), chosen on chat traces of seeds 10–14 only: the reported "
        "seeds were not used for tuning. On those tuning seeds, the previous LeCaR-style regret learning "
        "(replaced by miniature simulation) lost to the better of its two experts alone by up to 0.006, and "
        "a tenant-popularity prior for new keys (a key's first count set by its tenant's reuse ratio) moved "
        "saved compute by -0.0006 to +0.0011 per cell (mean +0.0002), a conversation-cluster prior by "
        "-0.0062 to +0.0022 (mean -0.0013): neither was kept. The hill climber of +TinyLFU(climb) uses "
        "Caffeine's constants (first step 6.25% of the capacity, 2% decay per period), not tuned here. "
        "TinyLFU admits a candidate that would evict several keys when its frequency estimate beats their "
        "byte-weighted mean (chosen over the most frequent victim and the victims' sum on tuning seeds only: "
        "chat 10–14, synthetic and QQP 10; `cachelm.policy.tinylfu` gives the rule and what the others "
        "measured).",
        "",
        f"### Target: {LEARNED} ≥ the best of {', '.join(BASELINES)} on the chat-derived traces — "
        + ("met at every capacity and seed" if met else "**not met everywhere** (see the rows marked no)"),
        "",
        target,
        "",
        "![saved compute by policy](img/policy_sim.png)",
        "",
    ]
    for trace in traces:
        parts += [trace_table(trace, results[trace.name], fractions), ""]
    markdown = "\n".join(parts)
    print(markdown)
    if not args.quick:
        plot(traces, results, fractions, _report.DOCS_IMG / "policy_sim.png")
        _report.write_section("policy_sim", markdown)


if __name__ == "__main__":
    main()
