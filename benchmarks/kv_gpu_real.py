"""KV prefix reuse on the GPU with the two real small models (SmolLM2-135M-Instruct, Gemma-3-270M, bf16):
TTFT of a miss and of hits from each tier and codec against the prefix length, beside each hit's limit.

    # on the GPU machine (models staged as in /work/shared/gpu/README.md), from the repository root:
    PYTHONPATH=/tmp/tf:src python3 benchmarks/kv_gpu_real.py --data DATA --out $OUT \\
        --model smollm2=/root/models/smollm2-135m-instruct-q4_1.gguf \\
        --model gemma3=/root/models/gemma-3-270m-q4_k_m.gguf
    # locally, to render the docs section from the JSON it brought back:
    .venv/bin/python benchmarks/kv_gpu_real.py --render docs/results/kv_gpu_real.json

The prompt is a long text from DATA/longtext (a different book per length is not needed: a hit's cost does not
depend on the words). TTFT = `Engine.prefill` (lookup + load + suffix prefill + logits), median of `--reps`
after one warm-up. Limit of a hit = the suffix prefill alone on an already restored cache (HF eager, the same
code path the hit ends in) + stored KV bytes ÷ the tier's copy bandwidth measured in the same run (device copy
for the GPU tier, pinned host→device for the CPU tier, page-cache file reads + host→device for disk). For
both models the GPU-tier hit is also run through the CUDA-graph `StaticRunner`.
Redis is not measured here: the GPU machine has no Redis server (the CPU benchmark covers that tier).
"""

from __future__ import annotations

import argparse
import json
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

TIERS = (  # (tier, codec)
    ("gpu", "raw"),
    ("cpu-pinned", "raw"),
    ("cpu-pinned", "int8"),
    ("cpu-pinned", "int4"),
    ("disk", "raw"),
    ("disk", "int4"),
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], reps: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bandwidths(tmp: Path, device: str) -> dict[str, float]:
    big = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)
    host = torch.empty(big.numel(), dtype=torch.uint8)
    if device != "cpu":
        host = host.pin_memory()
    out = {
        "gpu": big.numel() / _timed(lambda: dst.copy_(big), 5),
        "cpu-pinned": big.numel() / _timed(lambda: dst.copy_(host, non_blocking=True), 5),
    }
    read = file_read_bytes_per_s(tmp, lambda fn: _timed(fn, 3))
    out["disk"] = disk_to_device_bytes_per_s(read, out["cpu-pinned"])
    return out


def bench_model(name: str, path: str, text: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from cachelm.engine.engine import Engine, make_fingerprint
    from cachelm.engine.loader import load_model
    from cachelm.engine.static_runner import StaticRunner
    from cachelm.kv import hf
    from cachelm.kv.layout import KVLayout
    from cachelm.kv.prefix_cache import KVPrefixCache

    t0 = time.perf_counter()
    dev = args.device
    model, tok = load_model(path, device=dev, dtype=torch.bfloat16)
    print(f"{name}: loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    layout = KVLayout.from_model(model)
    fingerprint = make_fingerprint(model, name)
    ids = tok(text).input_ids
    suffix = tok(" Question: who is speaking in this passage, and what do they want? Answer:").input_ids
    suffix = (suffix * 8)[: args.suffix]
    # SmolLM2 holds 8,192 positions: its longest prefix is 8,192 - suffix.
    top = min(len(ids), layout_max(model)) - args.suffix
    lengths = sorted({min(n, top) for n in args.lengths})
    base = Engine(model, tok)
    bw = _bandwidths(tmp, dev)
    runner = None
    if model.config.model_type in ("llama", "gemma3_text"):  # packed weights: Llama only
        llama = model.config.model_type == "llama"
        runner = StaticRunner(model, max_tokens=max(lengths) + args.suffix, fuse_weights=llama)
    rows = []
    for length in lengths:
        prompt = ids[:length] + suffix
        miss = _timed(lambda p=prompt: base.prefill(p), args.reps)
        with torch.inference_mode():
            ref = base.prefill(prompt)
            full = hf.new_cache(model)
            model(input_ids=torch.tensor([prompt[:length]], device=dev), past_key_values=full)
            prefix_kv = hf.extract(full, length)

        def suffix_only(p: list[int] = prompt, kv: torch.Tensor = prefix_kv, n: int = length) -> None:
            cache = hf.new_cache(model)
            hf.restore(cache, kv, layout)
            with torch.inference_mode():
                model(input_ids=torch.tensor([p[n:]], device=dev), past_key_values=cache, logits_to_keep=1)

        t_suffix = _timed(suffix_only, args.reps)
        row: dict[str, Any] = {"prefix": length, "miss_s": miss, "suffix_s": t_suffix, "hits": {}}
        for kind, codec in TIERS:
            capacity = 16 << 30 if kind == "disk" else 8 << 30
            tier = make_tier(kind, codec, capacity=capacity, device=dev, folder=tmp)
            pc = KVPrefixCache(layout=layout, model=fingerprint, tiers=[tier], block_size=args.block_size)
            pc.store(prompt, prefix_kv, tenant_salt=b"bench")
            engine = Engine(model, tok, prefix_cache=pc)
            hit = _timed(lambda p=prompt, e=engine: e.prefill(p, tenant_salt=b"bench"), args.reps)
            logits = engine.prefill(prompt, tenant_salt=b"bench").logits
            entry = {
                "ttft_s": hit,
                "kv_bytes": tier.used_bytes,
                "limit_s": t_suffix + tier.used_bytes / bw[kind],
                "max_abs_logit_diff": (logits - ref.logits).abs().max().item(),
                "same_argmax": bool(logits.argmax() == ref.logits.argmax()),
            }
            if kind == "gpu" and runner is not None:
                fast = Engine(model, tok, prefix_cache=pc, static_runner=runner)
                entry["graphed_s"] = _timed(
                    lambda p=prompt, e=fast: e.prefill(p, tenant_salt=b"bench"), args.reps
                )
                g_logits = fast.prefill(prompt, tenant_salt=b"bench").logits
                entry["graphed_max_abs_logit_diff"] = (g_logits - ref.logits).abs().max().item()
            row["hits"][f"{kind}/{codec}"] = entry
            print(
                f"{name} {length}: {kind}/{codec} {hit * 1e3:.1f} ms (limit {entry['limit_s'] * 1e3:.1f})"
                + (f", graphed {entry['graphed_s'] * 1e3:.1f} ms" if "graphed_s" in entry else ""),
                flush=True,
            )
            tier.clear()
            pc.close()
        print(f"{name} {length}: miss {miss * 1e3:.1f} ms, suffix alone {t_suffix * 1e3:.1f} ms", flush=True)
        rows.append(row)
    return {"bandwidth": bw, "rows": rows, "logit_scale": float(ref.logits.abs().max())}


def layout_max(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 1 << 30))


def render(result: dict[str, Any]) -> str:
    lines = [
        "## KV prefix cache — GPU, the real small models (bf16)",
        "",
        f"Device: {result['device']} (torch {result['torch']}, transformers {result['transformers']}); "
        f"suffix = {result['suffix']} new tokens; block size {result['block_size']}; "
        f"median of {result['reps']} after a warm-up. "
        "TTFT = `Engine.prefill` (lookup + load + suffix + logits). "
        "Limit = the suffix alone on a restored cache + stored KV bytes ÷ the tier's copy bandwidth "
        "(measured in the same run). Redis is not on the GPU machine (see kv-cpu for that tier).",
        "Command: `PYTHONPATH=/tmp/tf:src python3 benchmarks/kv_gpu_real.py --data DATA --out $OUT "
        "--model smollm2=… --model gemma3=…` on the GPU machine.",
    ]
    for name, res in result["models"].items():
        tiers = list(res["rows"][0]["hits"])
        lines += [
            "",
            f"**{name}** — copy bandwidth GB/s: "
            + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in res["bandwidth"].items()),
            "",
            "| prefix | miss | suffix alone | " + " | ".join(f"{t} (limit)" for t in tiers) + " |",
            "|---|---|---|" + "---|" * len(tiers),
        ]
        for r in res["rows"]:
            cells = []
            for t in tiers:
                h = r["hits"][t]
                cell = f"{h['ttft_s'] * 1e3:.1f} ({h['limit_s'] * 1e3:.1f})"
                if "graphed_s" in h:
                    cell += f"; graphed {h['graphed_s'] * 1e3:.1f}"
                cells.append(cell)
            lines.append(
                f"| {r['prefix']} | {r['miss_s'] * 1e3:.1f} | {r['suffix_s'] * 1e3:.1f} | "
                + " | ".join(cells)
                + " |"
            )
        last = res["rows"][-1]
        best = min(last["hits"].values(), key=lambda h: h.get("graphed_s", h["ttft_s"]))
        best_s = best.get("graphed_s", best["ttft_s"])
        worst = max(h["max_abs_logit_diff"] for r in res["rows"] for h in r["hits"].values())
        lossless = max(
            h["max_abs_logit_diff"] for r in res["rows"] for t, h in r["hits"].items() if t.endswith("/raw")
        )
        same = all(h["same_argmax"] for r in res["rows"] for t, h in r["hits"].items() if t.endswith("/raw"))
        lines += [
            "",
            f"At {last['prefix']} tokens the fastest hit is {last['miss_s'] / best_s:.1f}× faster than "
            f"the miss. Max |Δlogit| vs the miss: raw codecs {lossless:.3f} (same argmax: {same}), all "
            f"codecs {worst:.3f} (logits up to {res['logit_scale']:.1f}).",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """TTFT against prefix length per model: the miss, the hit from each tier and codec, the graphed hit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, res in zip(axes[0], models.values(), strict=True):
        xs = [r["prefix"] for r in res["rows"]]
        ax.plot(xs, [r["miss_s"] * 1e3 for r in res["rows"]], "k-o", label="miss (full prefill)")
        for tier in res["rows"][0]["hits"]:
            ax.plot(xs, [r["hits"][tier]["ttft_s"] * 1e3 for r in res["rows"]], "--.", label=f"hit {tier}")
        graphed = [r["hits"].get("gpu/raw", {}).get("graphed_s") for r in res["rows"]]
        if all(g is not None for g in graphed):
            ax.plot(xs, [g * 1e3 for g in graphed], "g-s", label="hit gpu/raw, graphed runner")
    from _report import finish_ttft_plot

    finish_ttft_plot(fig, axes[0], [f"{name}, {result['device']}" for name in models], path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="NAME=PATH (repeatable)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048, 4096, 8192]
    )
    p.add_argument("--suffix", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    p.add_argument("--render", type=Path, default=None, help="render docs from a JSON result instead")
    args = p.parse_args(argv)
    if args.render:
        from _report import DOCS_IMG, write_section

        result = json.loads(args.render.read_text())
        write_section(
            "kv-gpu-real",
            render(result) + "\n\n![TTFT, real small models on the GPU](img/kv_ttft_gpu_real.png)",
        )
        plot(result, DOCS_IMG / "kv_ttft_gpu_real.png")
        print(render(result))
        return 0
    if not args.model or (args.device != "cpu" and not torch.cuda.is_available()):
        p.error("needs CUDA and at least one --model NAME=PATH")
    book = sorted((args.data / "longtext").glob("pg*_*.txt"))
    text = next(b for b in book if "LICENSE" not in b.name).read_text(encoding="utf-8", errors="replace")
    text = text[len(text) // 3 :][:120_000]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device != "cpu" else "CPU (smoke test)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "suffix": args.suffix,
        "block_size": args.block_size,
        "reps": args.reps,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.model:
            name, _, path = spec.partition("=")
            result["models"][name] = bench_model(name, path, text, args, Path(tmp))
            torch.cuda.empty_cache()  # the model is gone with bench_model's frame
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "kv_gpu_real.json").write_text(json.dumps(result, indent=1))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
