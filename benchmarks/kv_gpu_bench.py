"""KV prefix reuse on the GPU with an 8B-shaped random-weight Llama (bf16): full prefill vs GPU-tier and
CPU-tier (pinned) hits, through HF eager and through the static-buffer CUDA-graph runner, beside each
hit's physical limit.

    # on the GPU machine (see /work/shared/gpu/README.md), from the repository root:
    PYTHONPATH=/tmp/tf:src python3 benchmarks/kv_gpu_bench.py --out $OUT
    # locally, to render the docs section from the JSON it brought back:
    .venv/bin/python benchmarks/kv_gpu_bench.py --render docs/results/kv_gpu.json

Physical limit of a hit = suffix compute bound + KV bytes ÷ the copy bandwidth of the tier, where the compute
bound is max(suffix FLOPs ÷ measured bf16 matmul peak, weight bytes ÷ measured HBM bandwidth), and copy
bandwidths are measured in the same run (device→device for the GPU tier, pinned host→device for the CPU tier).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kv_tiers import disk_to_device_bytes_per_s, file_read_bytes_per_s, make_tier

CONFIGS: dict[str, dict[str, Any]] = {
    "8b": {  # Llama-3-8B shape
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 16384,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "tiny": {  # a CPU dry run of this script
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    fn()  # warm-up (and graph capture)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hardware(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Measured peak matmul FLOP/s, HBM bandwidth, device copy and pinned host→device bandwidth."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / _timed(lambda: a @ a, 5, device)
    big = torch.empty(1 << 29 if device.type == "cuda" else 1 << 24, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)
    t = _timed(lambda: dst.copy_(big), 5, device)
    out = {"matmul_flops": flops, "hbm_bytes_per_s": 2 * big.numel() / t, "d2d_bytes_per_s": big.numel() / t}
    if device.type == "cuda":
        host = torch.empty(big.numel(), dtype=torch.uint8).pin_memory()
        out["h2d_bytes_per_s"] = big.numel() / _timed(lambda: dst.copy_(host, non_blocking=True), 5, device)
    else:
        out["h2d_bytes_per_s"] = out["d2d_bytes_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        out["disk_read_bytes_per_s"] = file_read_bytes_per_s(Path(tmp), lambda fn: _timed(fn, 3, device))
    return out


# Tiers measured for every prefix: (name, kind, codec). The first two carry the issue's targets.
TIERS = (
    ("gpu", "gpu", "raw"),
    ("cpu-pinned", "cpu-pinned", "raw"),
    ("cpu-pinned/int8", "cpu-pinned", "int8"),
    ("cpu-pinned/int4", "cpu-pinned", "int4"),
    ("disk", "disk", "raw"),
    ("disk/int4", "disk", "int4"),
)


def _tier_bandwidth(kind: str, hw: dict[str, float]) -> float:
    """Bytes/s at which a tier's stored bytes reach the GPU."""
    if kind == "gpu":
        return hw["d2d_bytes_per_s"]
    if kind == "cpu-pinned":
        return hw["h2d_bytes_per_s"]
    return disk_to_device_bytes_per_s(hw["disk_read_bytes_per_s"], hw["h2d_bytes_per_s"])


def _efficient_ok(runner: Any, suffix: list[int], start: int, device: torch.device) -> str:
    """Whether the memory-efficient SDPA kernel accepts the runner's attention (else SDPA falls back)."""
    if device.type != "cuda":
        return "n/a"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            runner.forward_eager(torch.tensor([suffix], device=device), start)
        return "yes"
    except RuntimeError as exc:
        return f"no: {str(exc).splitlines()[0][:120]}"


def _profile(runner: Any, suffix: list[int], start: int, device: torch.device) -> str:
    """The GPU kernels of one un-graphed suffix forward of the chosen runner (same kernels as its graph),
    top 25 by device time: where the hit's time goes, for whoever optimises it next."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.tensor([suffix], device=device)
    runner.forward_eager(ids, start)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.forward_eager(ids, start)
        _sync(device)
    averages = prof.key_averages()
    table: str = averages.table(sort_by="device_time_total", row_limit=25, max_name_column_width=64)
    print(table, flush=True)
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cachelm.engine.engine import Engine, make_fingerprint
    from cachelm.engine.static_runner import StaticRunner
    from cachelm.kv import hf
    from cachelm.kv.layout import KVLayout
    from cachelm.kv.prefix_cache import KVPrefixCache

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    config = LlamaConfig(**CONFIGS[args.config])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    print(f"model built in {time.perf_counter() - t0:.1f}s", flush=True)
    hw = _hardware(device, dtype)
    print({k: f"{v:.3g}" for k, v in hw.items()}, flush=True)
    layout = KVLayout.from_model(model)
    fingerprint = make_fingerprint(model, f"random-llama-{args.config}")
    n_params = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel()
    lm_head = model.lm_head.weight.numel()
    weight_bytes = (n_params - embed) * dtype.itemsize  # the embedding is gathered, not streamed
    base = Engine(model, None)
    max_tokens = max(args.lengths) + args.suffix
    runners: dict[str, Any] = {"modules": StaticRunner(model, max_tokens=max_tokens, attention="split")}
    runners["packed"] = StaticRunner(model, max_tokens=max_tokens, attention="split", fuse_weights=True)
    if not args.no_compile:
        runners["compiled"] = StaticRunner(model, max_tokens=max_tokens, attention="split", compile=True)
    runner = runners["modules"]
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []

    def result(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The run's JSON; rows by prefix length (`--lengths` may list the longest first)."""
        return {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "config": args.config,
            "params": n_params,
            "weight_bytes": weight_bytes,
            "suffix": args.suffix,
            "block_size": args.block_size,
            "reps": args.reps,
            "hardware": hw,
            "rows": sorted(rows, key=lambda r: r["prefix"]),
        }

    for length in args.lengths:
        prompt = torch.randint(10, config.vocab_size, (length + args.suffix,), generator=gen).tolist()
        full_s = _timed(lambda p=prompt: base.prefill(p), args.reps, device)
        with torch.inference_mode():
            ref = base.prefill(prompt)
            prefix_kv = hf.extract(ref.cache, length + args.suffix)[:length]  # (P, L, 2, H, D)
        kv_bytes = prefix_kv.numel() * prefix_kv.element_size()
        tmp = Path(tempfile.mkdtemp(prefix="kv-bench-"))
        tiers = {
            name: (
                kind,
                make_tier(kind, codec, capacity=kv_bytes + (1 << 24), device=str(device), folder=tmp),
            )
            for name, kind, codec in TIERS
        }
        row: dict[str, Any] = {"prefix": length, "kv_bytes": kv_bytes, "full_s": full_s, "hits": {}}

        # Suffix alone, no load: eager HF on a restored cache, and the graphed runner.
        def eager_suffix(p: list[int] = prompt, kv: torch.Tensor = prefix_kv, n: int = length) -> None:
            cache = hf.new_cache(model)
            hf.restore(cache, kv, layout)
            with torch.inference_mode():
                model(
                    input_ids=torch.tensor([p[n:]], device=device),
                    past_key_values=cache,
                    logits_to_keep=1,
                )

        row["suffix_eager_s"] = _timed(eager_suffix, args.reps, device)
        for r in runners.values():
            r.kv[:length] = prefix_kv
        row["suffix_lean_s"] = _timed(
            lambda p=prompt, n=length, r=runner: r.forward_eager(torch.tensor([p[n:]], device=device), n),
            args.reps,
            device,
        )
        # Graphed runner variants side by side (module docstring of cachelm.engine.static_runner): plain
        # modules with split-KV attention, packed Q/K/V + gate/up weights, and torch.compile'd layer math,
        # each at several split-KV chunk sizes. The fastest is used for the tier hits below.
        variants: dict[str, float] = {}
        diffs: dict[str, float] = {}
        for vname, vrunner in runners.items():
            for chunk in args.chunks:
                vrunner.split_chunk = chunk
                key = f"{vname}/chunk{chunk}"
                try:
                    variants[key] = _timed(
                        lambda p=prompt, n=length, r=vrunner: r(p[n:], n), args.reps, device
                    )
                    out = vrunner(prompt[length:], length).clone()
                    diffs[key] = (out - base.prefill(prompt).logits).abs().max().item()
                except Exception as exc:  # a variant that fails (e.g. no Triton) is reported, not fatal
                    print(f"variant {key} failed: {str(exc).splitlines()[0][:200]}", flush=True)
                    continue
                print(f"prefix {length}: suffix {key} {variants[key] * 1e3:.2f} ms", flush=True)
        row["suffix_variants_s"] = variants
        row["suffix_variant_logit_diff"] = diffs
        best = min(variants, key=lambda k: variants[k])
        vname, chunk = best.split("/chunk")
        runner = runners[vname]
        runner.split_chunk = int(chunk)
        row["runner_variant"] = best
        row["suffix_graph_s"] = variants[best]
        row["efficient_attention"] = _efficient_ok(runner, prompt[length:], length, device)
        if args.profile and length == max(args.lengths) and device.type == "cuda":
            row["profile"] = _profile(runner, prompt[length:], length, device)
        attn_flops = 4 * layout.num_layers * args.suffix * (length + args.suffix) * config.hidden_size
        flops = 2 * (n_params - embed - lm_head) * args.suffix + 2 * lm_head + attn_flops
        compute_bound = max(flops / hw["matmul_flops"], weight_bytes / hw["hbm_bytes_per_s"])
        row["compute_bound_s"] = compute_bound
        for name, (kind, tier) in tiers.items():
            pc = KVPrefixCache(layout=layout, model=fingerprint, tiers=[tier], block_size=args.block_size)
            pc.store(prompt, prefix_kv, tenant_salt=b"bench")
            engine = Engine(model, None, prefix_cache=pc)
            eager = _timed(lambda p=prompt, e=engine: e.prefill(p, tenant_salt=b"bench"), args.reps, device)
            eager_logits = engine.prefill(prompt, tenant_salt=b"bench").logits

            def graph_hit(p: list[int] = prompt, c: KVPrefixCache = pc, r: Any = runner) -> torch.Tensor:
                match = c.match(p, tenant_salt=b"bench")
                c.load(match, out=r.kv)
                return r(p[match.num_tokens :], match.num_tokens)

            graphed = _timed(graph_hit, args.reps, device)
            # The same through Engine.prefill (+ the restore into a DynamicCache that decoding continues in).
            fast = Engine(model, None, prefix_cache=pc, static_runner=runner)
            engine_static = _timed(
                lambda p=prompt, e=fast: e.prefill(p, tenant_salt=b"bench"), args.reps, device
            )
            graph_logits = graph_hit().clone()
            stored = tier.used_bytes
            limit = compute_bound + stored / _tier_bandwidth(kind, hw)
            row["hits"][name] = {
                "stored_bytes": stored,
                "eager_s": eager,
                "graph_s": graphed,
                "engine_static_s": engine_static,
                "limit_s": limit,
                "eager_max_abs_logit_diff": (eager_logits - ref.logits).abs().max().item(),
                "graph_max_abs_logit_diff": (graph_logits - ref.logits).abs().max().item(),
                "graph_same_argmax": bool(graph_logits.argmax() == ref.logits.argmax()),
                "logit_scale": ref.logits.abs().max().item(),
            }
            print(
                f"prefix {length}: {name} hit eager {eager * 1e3:.1f} ms, graphed {graphed * 1e3:.1f} ms "
                f"(via Engine {engine_static * 1e3:.1f} ms), "
                f"limit {limit * 1e3:.1f} ms",
                flush=True,
            )
            tier.clear()
            pc.close()
            del engine, fast, pc
        print(
            f"prefix {length}: full {full_s * 1e3:.1f} ms; suffix eager {row['suffix_eager_s'] * 1e3:.1f} "
            f"ms, lean ungraphed {row['suffix_lean_s'] * 1e3:.1f} ms, "
            f"graphed {row['suffix_graph_s'] * 1e3:.1f} ms ({row['runner_variant']}), "
            f"compute bound {compute_bound * 1e3:.2f} ms, efficient attention: {row['efficient_attention']}",
            flush=True,
        )
        rows.append(row)
        if args.out:  # what a run cut short by its time limit still brings back (renderable as is)
            args.out.mkdir(parents=True, exist_ok=True)
            partial = result(rows)
            (args.out / "kv_gpu.partial.json").write_text(json.dumps(partial, indent=1))
        del ref, prefix_kv, tiers
        shutil.rmtree(tmp, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result(rows)


def render(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [
        f"## KV prefix cache — GPU, {result['config'].upper()}-shaped Llama, random weights, bf16",
        "",
        f"Device: {result['device']} (torch {result['torch']}, transformers {result['transformers']}); "
        f"{result['params'] / 1e9:.2f} B parameters; suffix = {result['suffix']} new tokens; block size "
        f"{result['block_size']}; median of {result['reps']}. Measured in the same run: bf16 matmul "
        f"{hw['matmul_flops'] / 1e12:.0f} TFLOP/s, HBM {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s, device copy "
        f"{hw['d2d_bytes_per_s'] / 1e9:.0f} GB/s, pinned host→device {hw['h2d_bytes_per_s'] / 1e9:.1f} GB/s.",
        "Command: `PYTHONPATH=/tmp/tf:src python3 benchmarks/kv_gpu_bench.py --out $OUT` on the GPU machine.",
        "",
        "*eager*: the engine's HF path (DynamicCache restore + HF forward of the suffix). *graphed*: blocks",
        "decoded straight into a static token-major KV buffer + the suffix as one CUDA-graph replay",
        "(`StaticRunner`).",
        "Limit = max(FLOPs ÷ peak, weight bytes ÷ HBM) + KV bytes ÷ tier copy bandwidth.",
        "",
        "| prefix | KV | full prefill | GPU hit eager | GPU hit graphed (limit) | CPU-pinned hit eager | "
        "CPU-pinned hit graphed (limit) | graphed suffix alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        g, c = r["hits"]["gpu"], r["hits"]["cpu-pinned"]
        lines.append(
            f"| {r['prefix']} | {r['kv_bytes'] / 1e9:.2f} GB | {r['full_s'] * 1e3:.1f} ms | "
            f"{g['eager_s'] * 1e3:.1f} ms | "
            f"{g['graph_s'] * 1e3:.1f} ms ({g['limit_s'] * 1e3:.1f}) | {c['eager_s'] * 1e3:.1f} ms | "
            f"{c['graph_s'] * 1e3:.1f} ms ({c['limit_s'] * 1e3:.1f}) | {r['suffix_graph_s'] * 1e3:.1f} ms |"
        )
    extra = [t for t in result["rows"][0]["hits"] if t not in ("gpu", "cpu-pinned")]
    if extra:
        lines += [
            "",
            "Graphed hits from the other tiers and codecs (stored size ÷ raw size; limit as above, with the "
            "stored bytes and, for disk, file reads then the pinned copy in series):",
            "",
            "| prefix | " + " | ".join(f"{t} (limit)" for t in extra) + " |",
            "|---|" + "---|" * len(extra),
        ]
        for r in result["rows"]:
            cells = [
                f"{r['hits'][t]['graph_s'] * 1e3:.1f} ms ({r['hits'][t]['limit_s'] * 1e3:.1f}); "
                f"{r['hits'][t]['stored_bytes'] / r['kv_bytes']:.2f}×"
                for t in extra
            ]
            lines.append(f"| {r['prefix']} | " + " | ".join(cells) + " |")
    keys = sorted({k for r in result["rows"] for k in r["suffix_variants_s"]})
    lines += [
        "",
        "The suffix alone (64 tokens on a loaded prefix, no lookup or copy) against its compute bound:",
        "",
        "| prefix | HF eager | lean, no graph | "
        + " | ".join(f"graphed {k}" for k in keys)
        + " | compute bound |",
        "|---|---|---|" + "---|" * len(keys) + "---|",
    ]
    for r in result["rows"]:
        cells = [
            f"{r['suffix_variants_s'][k] * 1e3:.1f} ms" if k in r["suffix_variants_s"] else "failed"
            for k in keys
        ]
        lines.append(
            f"| {r['prefix']} | {r['suffix_eager_s'] * 1e3:.1f} ms | {r['suffix_lean_s'] * 1e3:.1f} ms | "
            + " | ".join(cells)
            + f" | {r['compute_bound_s'] * 1e3:.1f} ms |"
        )
    diffs = [d for r in result["rows"] for d in r["suffix_variant_logit_diff"].values()]
    lines += [
        "",
        "*modules*: the model's own modules; *packed*: Q/K/V and gate/up packed into one GEMM each; "
        "*compiled*: packed + `torch.compile` of each layer's pre-/post-attention math; *chunkN*: split-KV "
        f"attention over N-key chunks. Every variant's logits are within {max(diffs):.3f} of the full "
        "prefill's.",
    ]
    last = result["rows"][-1]
    g, c = last["hits"]["gpu"], last["hits"]["cpu-pinned"]
    lines += [
        "",
        f"At {last['prefix']} tokens: GPU-tier hit (graphed) {last['full_s'] / g['graph_s']:.1f}× faster "
        f"than full prefill (target ≥ 20×); CPU-tier hit {last['full_s'] / c['graph_s']:.1f}× faster "
        "(target ≈ 7×) and "
        f"{c['graph_s'] / c['limit_s']:.2f}× its physical limit (target ≤ 1.5×).",
    ]
    if "engine_static_s" in g:
        lines.append(
            f"Through `Engine.prefill` with the runner (lookup, load and graph replay; the cache a later "
            f"decode continues in is restored lazily, when decoding starts): GPU tier "
            f"{g['engine_static_s'] * 1e3:.1f} ms, CPU tier {c['engine_static_s'] * 1e3:.1f} ms."
        )
    lines += [
        "",
        f"Runner used for the hits: {last['runner_variant']} (the fastest suffix variant at that length).",
        "",
        "Reuse vs recompute (bf16, max |Δlogit| against the full prefill; logits up to "
        f"{max(h['logit_scale'] for r in result['rows'] for h in r['hits'].values()):.1f}):",
        "",
        "| prefix | tier | eager | graphed | same argmax (graphed) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for name, h in r["hits"].items():
            lines.append(
                f"| {r['prefix']} | {name} | {h['eager_max_abs_logit_diff']:.3f} | "
                f"{h['graph_max_abs_logit_diff']:.3f} | {h['graph_same_argmax']} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = [r["prefix"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["full_s"] * 1e3 for r in rows], "k-o", label="full prefill (miss)")
    series = (
        ("eager_s", "--o", "hit, HF eager"),
        ("graph_s", "-o", "hit, graphed"),
        ("limit_s", ":", "physical limit"),
    )
    for tier, color in (("gpu", "tab:green"), ("cpu-pinned", "tab:blue")):
        for key, style, what in series:
            ys = [r["hits"][tier][key] * 1e3 for r in rows]
            ax.plot(xs, ys, style, color=color, label=f"{tier} {what}")
    from _report import finish_ttft_plot

    finish_ttft_plot(fig, [ax], [f"{result['config'].upper()}-shaped Llama, {result['device']}"], path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8192, 4096, 2048, 1024, 512],
        help="prefix lengths, measured in this order (longest first: a run cut short keeps the target's)",
    )
    p.add_argument("--suffix", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument(
        "--attention", choices=["sdpa", "split"], default="split", help="the runner's attention for hits"
    )
    p.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 2048])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--profile", action="store_true", help="kernel profile, longest prefix")
    p.add_argument("--out", type=Path, default=None, help="folder for kv_gpu.json")
    p.add_argument(
        "--render", type=Path, default=None, help="render docs from a JSON result instead of running"
    )
    args = p.parse_args(argv)
    if args.render:
        from _report import DOCS_IMG, write_section

        result = json.loads(args.render.read_text())
        write_section("kv-gpu", render(result))
        plot(result, DOCS_IMG / "kv_ttft_gpu.png")
        print(render(result))
        return 0
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_gpu.json").write_text(text)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
