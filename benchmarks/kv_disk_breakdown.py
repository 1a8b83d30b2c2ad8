"""Where a disk-tier KV hit spends its time, stage by stage, beside the whole `KVPrefixCache.load`.

BENCHMARKS.md `kv-gpu` showed the disk hit far above its limit (file reads, then the host→GPU copy). This
script splits one hit into the stages the disk tier used to run one after another for each block — read
the file, parse the safetensors bytes (a copy), check the SHA-256, decode into the output — and times each
stage alone over all the blocks of one stored prefix, and the XXH3-128 check that replaced the SHA-256.
Beside them, in the same run, whole loads: that old design re-enacted (one block after another, with the
copy and the SHA-256), and today's `KVPrefixCache.load` (the tensors are views of the bytes read, no copy;
blocks read and checked with XXH3-128 ahead on a thread pool) with one reader thread and with `--threads`,
and the last again from a disk tier that keeps its blocks encrypted (a `Keyring`: AES-256-GCM, no
checksum recomputed). The disk tier alone, so no promotion, as in kv_gpu_bench.py.

    .venv/bin/python benchmarks/kv_disk_breakdown.py                       # CPU, this machine
    PYTHONPATH=/tmp/tf:src python3 benchmarks/kv_disk_breakdown.py --device cuda --out $OUT   # GPU machine
    .venv/bin/python benchmarks/kv_disk_breakdown.py --render FILE         # the docs section from its JSON

Layout: Llama-3-8B's KV (32 layers, 8 KV heads, head dim 128, bf16), blocks of 256 tokens, random values,
raw codec. The files are read through the page cache (they were just written), as in kv_gpu_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("read", "parse", "checksum", "decode")
LOADS = ("before", "load_1", "load", "load_sealed")
CHECKS = ("xxh3",)  # today's checksum, timed alone like the stages (not part of the old design's sum)
LABELS = {
    "read": "read files",
    "parse": "parse (safetensors load, a copy)",
    "checksum": "SHA-256 check",
    "decode": "decode into the output",
    "sum": "sum of the stages",
    "xxh3": "XXH3-128 check (today)",
    "before": "old load: stages one block after another",
    "load_1": "`load`, 1 reader thread",
    "load": "`load`, reader pool",
    "load_sealed": "`load`, reader pool, encrypted at rest",
}


def _timed(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median seconds of `reps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(tokens: int, device: torch.device, folder: Path, reps: int, threads: int) -> dict[str, Any]:
    """Stage times (seconds, all blocks of a `tokens`-token prefix) and the whole load's."""
    from safetensors.torch import load as parse_safetensors

    from cachelm.crypto import Keyring
    from cachelm.keys import ModelFingerprint
    from cachelm.kv.codecs import checksum, codec_for, from_bytes
    from cachelm.kv.layout import KVLayout
    from cachelm.kv.prefix_cache import KVPrefixCache
    from cachelm.kv.tiers import DiskTier

    layout = KVLayout(
        num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, sliding_windows=(None,) * 32
    )
    block = 256
    budget = 4 * tokens * layout.bytes_per_token
    tier = DiskTier(folder / f"disk-{tokens}", capacity_bytes=budget)
    sealed = DiskTier(folder / f"sealed-{tokens}", capacity_bytes=budget, keyring=Keyring.generate())
    pc, pc_1, pc_sealed = (
        KVPrefixCache(
            layout=layout,
            model=ModelFingerprint(model_id="random-8b"),
            tiers=[t],
            block_size=block,
            read_threads=n,
        )
        for t, n in ((tier, threads), (tier, 1), (sealed, threads))
    )
    prompt = list(range(tokens + 1))
    kv = torch.randn(layout.block_shape(tokens)).to(layout.dtype)
    pc.store(prompt, kv, tenant_salt=b"bench")
    pc_sealed.store(prompt, kv, tenant_salt=b"bench")
    match_sealed = pc_sealed.match(prompt, tenant_salt=b"bench")
    files = sorted(tier.directory.glob("*/*.safetensors"))
    out = torch.empty(layout.block_shape(tokens), dtype=layout.dtype, device=device)
    match = pc.match(prompt, tenant_salt=b"bench")
    assert match.num_tokens == tokens and len(files) == tokens // block, "the prefix was not stored whole"

    datas = [p.read_bytes() for p in files]
    parsed = [parse_safetensors(d) for d in datas]
    blocks = [from_bytes(d) for d in datas]

    def decode() -> None:
        for i, b in enumerate(blocks):
            codec_for(b).decode(b, out=out[i * block : (i + 1) * block])

    def before() -> None:  # the disk tier's read path up to 2026-12-07, one block after another
        for i, path in enumerate(files):
            tensors = parse_safetensors(path.read_bytes())
            checksum(tensors, "sha256")
            b = blocks[i]
            codec_for(b).decode(replace(b, tensors=tensors), out=out[i * block : (i + 1) * block])

    seconds = {
        "read": _timed(lambda: [p.read_bytes() for p in files], reps, device),
        "parse": _timed(lambda: [parse_safetensors(d) for d in datas], reps, device),
        "checksum": _timed(lambda: [checksum(t, "sha256") for t in parsed], reps, device),
        "xxh3": _timed(lambda: [checksum(t, "xxh3_128") for t in parsed], reps, device),
        "decode": _timed(decode, reps, device),
        "before": _timed(before, reps, device),
        "load_1": _timed(lambda: pc_1.load(match, out=out), reps, device),
        "load": _timed(lambda: pc.load(match, out=out), reps, device),
        "load_sealed": _timed(lambda: pc_sealed.load(match_sealed, out=out), reps, device),
    }
    if not torch.equal(out.cpu(), kv):
        raise AssertionError("the encrypted tier loaded other KV than was stored")
    pc.close()
    pc_sealed.close()
    seconds["sum"] = sum(seconds[s] for s in STAGES)
    return {"tokens": tokens, "blocks": len(files), "bytes": sum(len(d) for d in datas), "seconds": seconds}


def render(results: dict[str, Any]) -> str:
    rows = results["rows"]
    # older runs lack the sealed load and the XXH3 check
    loads, checks = ([k for k in ks if all(k in row["seconds"] for row in rows)] for ks in (LOADS, CHECKS))
    keys = [*STAGES, "sum", *checks, *loads]
    head = "| prefix | stored | " + " | ".join(LABELS[k] for k in keys) + " |"
    lines = [
        f"## KV disk tier — where a hit's time goes (output on {results['device']})",
        "",
        f"Machine: {results['machine']}; output on `{results['device']}`; "
        f"{results['threads']} threads in the pool.",
        f"Command: `{results['command']}`",
        "",
        "Llama-3-8B's KV layout (32 layers, 8 KV heads, head dim 128, bf16), blocks of 256 tokens, raw "
        "codec, files in the page cache. Each stage is timed alone over every block of the prefix (median of "
        f"{results['reps']}, ms, with GB/s of stored bytes). The old load runs the four stages one block "
        "after another, as the disk tier did until 2026-12-07; `load` is the whole hit as it serves it now "
        "(no parse copy: the tensors are views of the bytes read; blocks read and checked ahead on a "
        "pool of reader threads" + ("; the check is XXH3-128 where it was SHA-256)." if checks else ")."),
        "",
        head,
        "|---|---|" + "---|" * len(keys),
    ]
    for row in rows:
        cells = [
            f"{1000 * row['seconds'][k]:.0f} ms ({row['bytes'] / row['seconds'][k] / 1e9:.2f} GB/s)"
            for k in keys
        ]
        lines.append(f"| {row['tokens']} | {row['bytes'] / 1e9:.2f} GB | " + " | ".join(cells) + " |")
    last = rows[-1]["seconds"]
    share = ", ".join(f"{LABELS[s]} {100 * last[s] / last['sum']:.0f} %" for s in STAGES)
    lines += [
        "",
        f"At {rows[-1]['tokens']} tokens the stages split as: {share}. Today's load takes "
        f"{last['load'] / last['before']:.2f}× the old load's time with {results['threads']} reader threads "
        f"and {last['load_1'] / last['before']:.2f}× with one."
        + (
            f" XXH3-128 checks the blocks {last['checksum'] / last['xxh3']:.1f}× faster than SHA-256."
            if checks
            else ""
        )
        + (
            f" Encrypted at rest, the pooled load takes {last['load_sealed'] / last['load']:.2f}× the "
            "plain one (AES-256-GCM opened by each reader thread, straight into the buffer the tensors view; "
            "no checksum, as the GCM tag already covers every byte)."
            if "load_sealed" in loads
            else ""
        ),
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    from _report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        ms = [1000 * r["seconds"][stage] for r in rows]
        ax.bar([i - 0.2 for i in x], ms, 0.4, bottom=bottom, label=LABELS[stage])
        bottom = [b + m for b, m in zip(bottom, ms, strict=True)]
    for offset, key, color in (
        (0.07, "before", "grey"),
        (0.17, "load_1", "tab:olive"),
        (0.27, "load", "black"),
        (0.37, "load_sealed", "tab:red"),
    ):
        if key not in rows[0]["seconds"]:
            continue
        ax.bar(
            [i + offset for i in x],
            [1000 * r["seconds"][key] for r in rows],
            0.1,
            color=color,
            label=LABELS[key].replace("`", ""),
        )
    ax.set_xticks(list(x), [f"{r['tokens']} tokens" for r in rows])
    ax.set_ylabel("ms")
    ax.set_title(f"Disk-tier hit, stage by stage ({results['device']})")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192", help="prefix lengths, multiples of 256")
    p.add_argument("--device", default="cpu", help="where the loaded KV goes (cpu or cuda)")
    p.add_argument(
        "--dir", type=Path, default=None, help="folder for the disk tier (default: a temporary one)"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="where the JSON and the PNG go")
    p.add_argument("--render", type=Path, default=None, help="only rewrite the docs section from this JSON")
    args = p.parse_args(argv)
    from _report import DOCS_IMG, machine_description, write_section

    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        lengths = [int(t) for t in args.tokens.split(",") if t]
        if not lengths or any(t <= 0 or t % 256 for t in lengths) or args.reps < 1 or args.threads < 1:
            p.error("--tokens must be positive multiples of 256; --reps and --threads ≥ 1")
        device = torch.device(args.device)
        gpu = f"{torch.cuda.get_device_name(0)}; " if device.type == "cuda" else ""
        results = {
            "machine": gpu + machine_description(),
            "device": args.device,
            "threads": args.threads,
            "reps": args.reps,
            "command": " ".join(
                ["python benchmarks/kv_disk_breakdown.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "rows": [],
        }
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for tokens in lengths:
                row = measure(tokens, device, Path(tmp), args.reps, args.threads)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"kv_disk_breakdown_{args.device.split(':')[0]}.json").write_text(
            json.dumps(results, indent=1)
        )
    md = render(results)
    print(md)
    plot(results, DOCS_IMG / f"kv_disk_breakdown_{results['device'].split(':')[0]}.png")
    write_section(f"kv-disk-breakdown-{results['device'].split(':')[0]}", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
