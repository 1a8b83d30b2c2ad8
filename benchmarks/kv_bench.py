"""KV prefix cache on CPU with the real SmolLM2-135M-Instruct: TTFT vs prefix length per tier and codec,
codec size ratio and perplexity change, and a multi-turn chat replay.

    .venv/bin/python -m cachelm.engine.models --cache-dir .cache/models pull smollm2
    .venv/bin/python benchmarks/kv_bench.py --data /work/shared/data --models-dir .cache/models

Writes the `kv-cpu` section of docs/BENCHMARKS.md and docs/img/kv_ttft_cpu.png.

TTFT is prefill + first-token argmax, median of `--reps` runs, measured side by side in one process.
Beside every hit, its physical limit: the suffix prefill alone (on an already restored cache) plus the KV
bytes the tier must deliver ÷ that tier's copy bandwidth, both measured in the same run (memory: a copy of
256 MB; disk: reads of 2 MB files just written, i.e. from the page cache, as the hits are; Redis: GETs of
2 MB values over the loopback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS_IMG, machine_description, save_figure, write_section
from cachelm.engine.engine import Engine, SamplingParams, make_fingerprint
from cachelm.engine.loader import load_model
from cachelm.kv import hf
from cachelm.kv.codecs import make_codec
from cachelm.kv.layout import KVLayout
from cachelm.kv.prefix_cache import KVPrefixCache
from cachelm.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier

CONFIGS = [  # (tier, codec)
    ("cpu", "raw"),
    ("cpu", "float16"),
    ("cpu", "int8"),
    ("cpu", "int4"),
    ("disk", "raw"),
    ("disk", "int4"),
    ("redis", "raw"),
    ("redis", "int4"),
]


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bandwidths(redis_url: str | None, tmp: Path) -> dict[str, float]:
    """Bytes per second of each tier's copy path, moved in 2 MB pieces (about one KV block of SmolLM2 at
    block size 64), one after another — the way a hit reads its blocks."""
    out: dict[str, float] = {}
    x = torch.randn(64 << 20)  # 256 MB float32
    y = torch.empty_like(x)
    y.copy_(x)
    out["cpu"] = x.numel() * 4 / _median_time(lambda: y.copy_(x), 3)
    piece = x[: 1 << 19].numpy().tobytes()  # 2 MB
    count = 64
    paths = [tmp / f"bw{i}.bin" for i in range(count)]
    for path in paths:
        path.write_bytes(piece)
    out["disk"] = count * len(piece) / _median_time(lambda: [p.read_bytes() for p in paths], 3)
    for path in paths:
        path.unlink()
    if redis_url:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = [f"kvbench:{uuid.uuid4().hex}" for _ in range(count)]
        for key in keys:
            client.set(key, piece)
        out["redis"] = count * len(piece) / _median_time(lambda: [client.get(k) for k in keys], 3)
        client.delete(*keys)
    return out


def _make_tier(kind: str, codec: str, tmp: Path, redis_url: str | None) -> Tier:
    c = make_codec(codec)
    if kind == "cpu":
        return MemoryTier(capacity_bytes=8 << 30, device="cpu", codec=c)
    if kind == "disk":
        return DiskTier(tmp / f"disk-{codec}-{uuid.uuid4().hex[:6]}", capacity_bytes=32 << 30, codec=c)
    assert redis_url
    return RedisTier(redis_url, namespace=f"kvbench{uuid.uuid4().hex[:8]}", capacity_bytes=8 << 30, codec=c)


def bench_ttft(model: Any, tok: Any, ids: list[int], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    layout = KVLayout.from_model(model)
    fingerprint = make_fingerprint(model, "smollm2-135m-instruct-q4_1")
    bw = _bandwidths(args.redis_url, tmp)
    print("bandwidth GB/s:", {k: round(v / 1e9, 2) for k, v in bw.items()}, flush=True)
    base = Engine(model, tok)
    suffix = tok(" Question: who is speaking in this passage, and what do they want? Answer:").input_ids
    suffix = (suffix * 4)[: args.suffix]
    rows: list[dict[str, Any]] = []
    configs = [c for c in CONFIGS if c[0] != "redis" or args.redis_url]
    for length in args.lengths:
        prompt = ids[:length] + suffix
        with torch.inference_mode():
            full = hf.new_cache(model)
            model(input_ids=torch.tensor([prompt[:length]]), past_key_values=full, logits_to_keep=1)
            prefix_kv = hf.extract(full, length)

        def suffix_only(p: list[int] = prompt, kv: torch.Tensor = prefix_kv, n: int = length) -> None:
            # The suffix alone on a restored cache (no lookup, no load): the compute part of every limit.
            cache = hf.new_cache(model)
            hf.restore(cache, kv, layout)
            with torch.inference_mode():
                model(input_ids=torch.tensor([p[n:]]), past_key_values=cache, logits_to_keep=1)

        runs: dict[str, Callable[[], Any]] = {
            "miss": lambda p=prompt: base.prefill(p),
            "suffix": suffix_only,
        }
        caches: dict[str, tuple[Tier, KVPrefixCache]] = {}
        for kind, codec in configs:
            tier = _make_tier(kind, codec, tmp, args.redis_url)
            pc = KVPrefixCache(layout=layout, model=fingerprint, tiers=[tier], block_size=args.block_size)
            pc.store(prompt, prefix_kv, tenant_salt=b"bench")
            engine = Engine(model, tok, prefix_cache=pc)
            caches[f"{kind}/{codec}"] = (tier, pc)
            runs[f"{kind}/{codec}"] = lambda p=prompt, e=engine: e.prefill(p, tenant_salt=b"bench")
        # Round robin: every configuration is timed once per round, so load changes on the shared machine
        # hit all of them alike instead of whichever happened to run during a busy minute.
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        miss, t_suffix = statistics.median(times["miss"]), statistics.median(times["suffix"])
        row: dict[str, Any] = {"prefix": length, "miss_s": miss, "suffix_s": t_suffix, "hits": {}}
        for name, (tier, pc) in caches.items():
            assert pc.stats.hit_tokens == length * args.reps, pc.stats
            hit, kind = statistics.median(times[name]), name.split("/")[0]
            limit = t_suffix + tier.used_bytes / bw[kind]
            row["hits"][name] = {"ttft_s": hit, "limit_s": limit, "kv_bytes": tier.used_bytes}
            print(f"prefix {length}: {name} hit {hit * 1e3:.0f} ms (limit {limit * 1e3:.0f} ms)", flush=True)
            tier.clear()
            pc.close()
        print(f"prefix {length}: miss {miss * 1e3:.0f} ms, suffix alone {t_suffix * 1e3:.0f} ms", flush=True)
        rows.append(row)
    return {"bandwidth": bw, "rows": rows, "suffix_tokens": len(suffix)}


def bench_codecs(model: Any, tok: Any, data: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Perplexity of `eval` tokens after a stored `prefix` decoded through each codec, vs fp16 stored KV."""
    layout = KVLayout.from_model(model)
    books = sorted(b for b in (data / "longtext").glob("pg*_*.txt") if "LICENSE" not in b.name)
    windows = []
    for book in books[: args.ppl_windows]:
        text = book.read_text(encoding="utf-8", errors="replace")
        start = len(text) // 3  # skip the Gutenberg header and front matter
        windows.append(tok(text[start : start + 40_000]).input_ids[: args.ppl_prefix + args.ppl_eval])
    results = []
    codecs = ["float16", "int8", "int4"]
    nll = {c: 0.0 for c in codecs}
    count = 0
    sizes = {c: 0 for c in codecs}
    with torch.inference_mode():
        for w_ids in windows:
            cache = hf.new_cache(model)
            model(input_ids=torch.tensor([w_ids[: args.ppl_prefix]]), past_key_values=cache, logits_to_keep=1)
            kv = hf.extract(cache, args.ppl_prefix)
            target = torch.tensor(w_ids[args.ppl_prefix :])
            for name in codecs:
                codec = make_codec(name)
                blocks = []
                for s in range(0, args.ppl_prefix, args.block_size):
                    enc = codec.encode(kv[s : s + args.block_size])
                    sizes[name] += enc.nbytes
                    blocks.append(codec.decode(enc))
                restored = hf.new_cache(model)
                hf.restore(restored, torch.cat(blocks), layout)
                # Logits of eval tokens 0..n-2 predict tokens 1..n-1; the last prefix token's logits are
                # not recomputed here, so the first eval token is not scored (same for every codec).
                logits = model(input_ids=target[None], past_key_values=restored).logits[0, :-1].float()
                nll[name] += torch.nn.functional.cross_entropy(logits, target[1:], reduction="sum").item()
            count += len(target) - 1
            print(f"ppl window {len(results) + 1}/{len(windows)} done", flush=True)
            results.append(None)
    fp16_bytes = sizes["float16"]
    base_ppl = float(torch.exp(torch.tensor(nll["float16"] / count)))
    out = []
    for name in codecs:
        ppl = float(torch.exp(torch.tensor(nll[name] / count)))
        out.append(
            {
                "codec": name,
                "ratio_vs_fp16": fp16_bytes / sizes[name],
                "ppl": ppl,
                "ppl_change_pct": (ppl / base_ppl - 1) * 100,
            }
        )
    del layout
    return out


def bench_chat(model: Any, tok: Any, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Replay MT-Bench-101 dialogues turn by turn (the model's own answers as history), with and without."""
    dialogues = [json.loads(line) for line in (data / "chat" / "mtbench101.jsonl").open()][
        : args.chat_dialogues
    ]
    layout = KVLayout.from_model(model)
    fingerprint = make_fingerprint(model, "smollm2-135m-instruct-q4_1")
    pc = KVPrefixCache(
        layout=layout,
        model=fingerprint,
        tiers=[MemoryTier(capacity_bytes=4 << 30)],
        block_size=args.block_size,
    )
    cached, plain = Engine(model, tok, prefix_cache=pc), Engine(model, tok)
    params = SamplingParams(max_new_tokens=args.chat_new_tokens)
    ttft: dict[str, list[float]] = {"with": [], "without": []}
    prompt_tokens = saved = turns = agree = 0
    for d in dialogues:
        history: list[dict[str, str]] = []
        for turn in d["history"][: args.chat_turns]:
            history.append({"role": "user", "content": turn["user"]})
            r_plain = plain.generate(history, params)
            r_cached = cached.generate(history, params)
            ttft["without"].append(r_plain.ttft_s)
            ttft["with"].append(r_cached.ttft_s)
            prompt_tokens += r_cached.num_prompt_tokens
            saved += r_cached.num_cached_tokens
            agree += r_plain.token_ids == r_cached.token_ids
            turns += 1
            history.append({"role": "assistant", "content": r_cached.text})
        print(f"chat dialogue {d['id']} done ({turns} turns)", flush=True)

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]

    return {
        "dialogues": len(dialogues),
        "turns": turns,
        "prompt_tokens": prompt_tokens,
        "saved_tokens": saved,
        "agree": agree,
        "p50": {k: pct(v, 50) for k, v in ttft.items()},
        "p95": {k: pct(v, 95) for k, v in ttft.items()},
    }


def _plot(ttft: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ttft["rows"]
    xs = [r["prefix"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(xs, [r["miss_s"] * 1e3 for r in rows], "k-o", label="miss (full prefill)")
    for name in rows[0]["hits"]:
        line = ax.plot(xs, [r["hits"][name]["ttft_s"] * 1e3 for r in rows], "-o", label=f"hit {name}")
        ax.plot(xs, [r["hits"][name]["limit_s"] * 1e3 for r in rows], ":", color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached prefix (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("SmolLM2-135M on CPU: TTFT, miss vs hits (dotted: physical limit)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def _report(
    ttft: dict[str, Any], codecs: list[dict[str, Any]], chat: dict[str, Any], run: dict[str, Any]
) -> str:
    """The docs section; `run` is `_run_record` of the measuring run (its machine and settings)."""
    bw = ttft["bandwidth"]
    lines = [
        "## KV prefix cache — CPU, SmolLM2-135M-Instruct (real model, float32)",
        "",
        f"Machine: {run['machine']} (2-core CI-class VM, shared with other jobs: absolute times are",
        "noisy, ratios within a row were measured side by side). Command:",
        "`.venv/bin/python benchmarks/kv_bench.py --data /work/shared/data "
        + (f"--models-dir {run['models_dir']} " if run["models_dir"] else "")
        + f"--lengths {','.join(map(str, run['lengths']))} --reps {run['reps']}`",
        "",
        f"TTFT = prefill + first token, median of {run['reps']} rounds (configurations interleaved); "
        f"suffix = {ttft['suffix_tokens']} new tokens "
        f"after the cached prefix; block size {run['block_size']}. Limit = suffix prefill alone + KV bytes ÷ "
        "tier bandwidth "
        "(measured here: "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items())
        + "; disk = page cache).",
        f"Prefixes stop at {max(run['lengths'])} tokens on CPU: one 4K miss costs minutes on this shared "
        "2-core machine; the GPU section covers 1K–8K. The suffix-alone time varies by about ±20% between "
        "samples here, so a hit can land slightly below its limit.",
        "",
    ]
    names = list(ttft["rows"][0]["hits"])
    lines.append("| prefix | miss | " + " | ".join(f"hit {n} (limit)" for n in names) + " | best speed-up |")
    lines.append("|---|---|" + "---|" * len(names) + "---|")
    for r in ttft["rows"]:
        cells = [
            f"{r['hits'][n]['ttft_s'] * 1e3:.0f} ms ({r['hits'][n]['limit_s'] * 1e3:.0f})" for n in names
        ]
        best = min(r["hits"][n]["ttft_s"] for n in names)
        lines.append(
            f"| {r['prefix']} | {r['miss_s'] * 1e3:.0f} ms | "
            + " | ".join(cells)
            + f" | {r['miss_s'] / best:.1f}× |"
        )
    one_k = next((r for r in ttft["rows"] if r["prefix"] == 1024), None)
    if one_k:
        ratio = one_k["miss_s"] / one_k["hits"]["cpu/raw"]["ttft_s"]
        verdict = "met" if ratio >= 10 else "NOT met"
        lines += [
            "",
            f"Target (1K prefix, CPU-tier hit ≥ 10× lower TTFT than a miss): {ratio:.1f}× — {verdict}.",
        ]
    lines += [
        "",
        "![TTFT vs prefix](img/kv_ttft_cpu.png)",
        "",
        f"### Codecs: size and perplexity ({run['ppl_windows']} windows of {run['ppl_prefix']} stored + "
        f"{run['ppl_eval']} scored tokens from /work/shared/data/longtext)",
        "",
        "The stored prefix's KV goes through the codec; the next tokens are computed in full precision on",
        "top of it and scored. Baseline: the same KV stored as float16.",
        "",
        "| codec | size vs fp16 | perplexity | change |",
        "|---|---|---|---|",
    ]
    for c in codecs:
        lines.append(
            f"| {c['codec']} | {c['ratio_vs_fp16']:.2f}× smaller | {c['ppl']:.3f} "
            f"| {c['ppl_change_pct']:+.3f}% |"
        )
    lines += [
        "",
        "Targets: int4 ≥ 3.5× at ≤ +1% perplexity, int8 ≥ 1.9× at ≤ +0.1%.",
        "",
        f"### Multi-turn chat replay (MT-Bench-101, first {chat['dialogues']} dialogues, up to "
        f"{run['chat_turns']} turns, greedy, {run['chat_new_tokens']} new tokens per turn; the model's own "
        "answers are the history)",
        "",
        "| | prompt tokens | prefill tokens saved | TTFT P50 | TTFT P95 |",
        "|---|---|---|---|---|",
        f"| without cache | {chat['prompt_tokens']} | 0 | {chat['p50']['without'] * 1e3:.0f} ms | "
        f"{chat['p95']['without'] * 1e3:.0f} ms |",
        f"| with cache | {chat['prompt_tokens']} | {chat['saved_tokens']} "
        f"({chat['saved_tokens'] / max(chat['prompt_tokens'], 1):.0%}) | "
        f"{chat['p50']['with'] * 1e3:.0f} ms | "
        f"{chat['p95']['with'] * 1e3:.0f} ms |",
        "",
        f"Answers identical with and without the cache in {chat['agree']} of {chat['turns']} turns.",
    ]
    return "\n".join(lines)


_SETTINGS = (
    "models_dir", "lengths", "reps", "block_size", "ppl_windows", "ppl_prefix", "ppl_eval", "chat_turns",
    "chat_new_tokens",
)  # fmt: skip


def _run_record(args: argparse.Namespace) -> dict[str, Any]:
    """What the report needs to know about the measuring run: saved beside its numbers so that `--render`
    names that run's machine and settings, not those of the machine rendering."""
    record: dict[str, Any] = {"machine": machine_description()}
    for name in _SETTINGS:
        value = getattr(args, name)
        record[name] = str(value) if isinstance(value, Path) else value
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="required unless --render")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048])
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--redis-url", default=os.environ.get("CACHELM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--ppl-windows", type=int, default=3)
    p.add_argument("--ppl-prefix", type=int, default=1024)
    p.add_argument("--ppl-eval", type=int, default=512)
    p.add_argument("--chat-dialogues", type=int, default=10)
    p.add_argument("--chat-turns", type=int, default=3)
    p.add_argument("--chat-new-tokens", type=int, default=24)
    # One thread: on the shared 2-core VM two OpenMP threads spin against other jobs and run slower.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    p.add_argument("--render", type=Path, default=None, help="re-render the docs from an --out-json file")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        if "run" not in saved:
            p.error(f"{args.render} has no run record (machine, settings): rerun with --out-json")
        report = _report(saved["ttft"], saved["codecs"], saved["chat"], saved["run"])
        _plot(saved["ttft"], DOCS_IMG / "kv_ttft_cpu.png")
        write_section("kv-cpu", report)
        print(report)
        return 0
    if args.data is None:
        p.error("--data DIR is required (the shared data folder: longtext, chat logs)")
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2", cache_dir=args.models_dir)
    text = (args.data / "longtext" / "pg84_frankenstein.txt").read_text(encoding="utf-8")
    ids = tok(text[len(text) // 4 :][:120_000]).input_ids
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        ttft = bench_ttft(model, tok, ids, args, Path(tmp))
    codecs = bench_codecs(model, tok, args.data, args)
    print(codecs, flush=True)
    chat = bench_chat(model, tok, args.data, args)
    print(chat, flush=True)
    run = _run_record(args)
    report = _report(ttft, codecs, chat, run)
    print(report)
    if args.out_json:
        saved = {"run": run, "ttft": ttft, "codecs": codecs, "chat": chat}
        args.out_json.write_text(json.dumps(saved, indent=1))
    if not args.no_write:
        _plot(ttft, DOCS_IMG / "kv_ttft_cpu.png")
        write_section("kv-cpu", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
