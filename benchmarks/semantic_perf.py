"""Semantic-cache performance: ANN library comparison, lookup latency, recall, insert rate, memory.

    python benchmarks/semantic_perf.py --data ../shared/data --report

Vectors are real embeddings of the QQP questions by the embedder under test (`MiniLMEmbedder()`'s default,
or `--checkpoint` / `--quantize`; read from the evaluation's embedding cache, `.cache/semantic_eval/`, or
computed from --data). Where more entries are needed than distinct real
questions exist, the rest are real vectors plus Gaussian noise (cosine ≈ 0.94 to their source), so the
index holds realistic clusters rather than uniform random points. Queries are 500 held-out real vectors.

Measured, at each size (10K and 100K entries by default), on the same data:
1. usearch vs hnswlib vs faiss HNSW, equal settings (M=16, ef_construction=128, ef_search=64): build
   throughput, single-query P50, recall@1 against exact search, bytes per entry (serialised index / entry).
2. cachelm's indexes (`FlatIndex`, `HNSWIndex` with the chosen backend): search-only P50 through the
   `VectorIndex` API, and lookup P50 through `SemanticCache.search` with a request dict — key derivation,
   MiniLM embedding of an unseen question, search and decision together.
3. Insert throughput through `SemanticCache.add_vector` (in memory, and persisted to SQLite) and process
   memory per entry (RSS growth / entries).
"""

from __future__ import annotations

import os

# One BLAS thread for numpy: a single query's mat-vec gains nothing from threads, and on a shared 2-core VM
# spinning BLAS workers turned a 0.2 ms flat search into 7 ms of CPU. Must be set before numpy loads. (The
# HNSW libraries keep their own thread pools for building.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _report import DOCS_IMG, machine_description, save_figure, write_section
from cachelm.semantic import (
    EmbeddingCache,
    FlatIndex,
    HNSWConfig,
    HNSWIndex,
    IndexEntry,
    MiniLMEmbedder,
    SemanticCache,
    StaticThreshold,
)
from cachelm.semantic.datasets import cached_vectors, embed_cached, load_meancache
from cachelm.semantic.hnsw import BACKENDS, GraphPartition
from cachelm.store import MemoryStore

_DEFAULT = HNSWConfig()
M, EF_ADD, EF_SEARCH = _DEFAULT.connectivity, _DEFAULT.expansion_add, _DEFAULT.expansion_search


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def real_vectors(data: Path, cache_dir: Path, embedder: MiniLMEmbedder) -> tuple[np.ndarray, list[str]]:
    """All distinct QQP question vectors available (cached shards first, MeanCache test+val otherwise)."""
    texts = cached_vectors(cache_dir, embedder.model_id)
    if len(texts) < 20_000:
        qs = [*load_meancache(data, "test").a, *load_meancache(data, "val").a]
        vecs = embed_cached(embedder, qs, cache_dir)
        texts.update(zip(qs, vecs, strict=True))
    names = sorted(texts)
    return np.stack([texts[t] for t in names]).astype(np.float32), names


def corpus(real: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`n` vectors: real ones first, then noisy copies of random real ones. Returns (vectors, real count)."""
    if n <= len(real):
        return real[:n].copy(), n
    extra = real[rng.integers(0, len(real), n - len(real))]
    noisy = extra + rng.standard_normal(extra.shape).astype(np.float32) * (0.35 / np.sqrt(real.shape[1]))
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    return np.concatenate([real, noisy]), len(real)


def p50_us(fn: Any, items: Any) -> tuple[float, float]:
    """Median (wall, CPU) microseconds of `fn(item)`. CPU time (process_time) is what the call costs on an
    idle core; wall time adds waiting for a core, which on this shared VM dominates."""
    wall, cpu = [], []
    for item in items:
        c, t = time.process_time_ns(), time.perf_counter_ns()
        fn(item)
        wall.append(time.perf_counter_ns() - t)
        cpu.append(time.process_time_ns() - c)
    return statistics.median(wall) / 1000, statistics.median(cpu) / 1000


def probe(part: GraphPartition, queries: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """(recall@1 against exact search, query P50 wall µs, query P50 CPU µs) of one built graph."""
    for q in queries[:20]:  # warm caches
        part.search(q, 1)
    top1 = np.array([part.search(q, 1)[0][0] - 1 for q in queries])
    wall, cpu = p50_us(lambda q: part.search(q, 1), queries)
    return float((top1 == exact).mean()), wall, cpu


def compare_libraries(
    base: np.ndarray, queries: np.ndarray, exact: np.ndarray, efs: list[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each library's graph at the default settings (build rate, P50, recall@1, bytes per entry), and the
    hnswlib graph searched again with each ef_search in `efs` — what `HNSWConfig.expansion_search` is
    chosen from. Returns (library rows, ef rows)."""
    rows, sweep = [], []
    labels = list(range(1, len(base) + 1))
    config = dict(connectivity=M, expansion_add=EF_ADD, expansion_search=EF_SEARCH, min_graph_size=1)
    for backend in BACKENDS:
        gc.collect()
        before = rss_bytes()
        part = GraphPartition(base.shape[1], HNSWConfig(backend=backend, **config), capacity=len(base))
        t = time.perf_counter()
        part.add_many(labels, base)
        build = time.perf_counter() - t
        rss = rss_bytes() - before
        recall, wall, cpu = probe(part, queries, exact)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "graph"
            part.save(path)
            size = path.stat().st_size
        rows.append(
            {
                "backend": backend,
                "n": len(base),
                "build_per_s": len(base) / build,
                "p50_us": wall,
                "cpu_p50_us": cpu,
                "recall@1": recall,
                "file_bytes_per_entry": size / len(base),
                "rss_bytes_per_entry": rss / len(base),
            }
        )
        print(
            f"  {backend:8s} n={len(base)} build {len(base) / build:8.0f}/s p50 {wall:7.1f}us "
            f"recall@1 {recall:.4f} {size / len(base):6.0f} B/entry",
            file=sys.stderr,
            flush=True,
        )
        if backend == "hnswlib":
            for ef in efs:
                part.set_expansion_search(ef)
                recall, wall, _ = probe(part, queries, exact)
                sweep.append({"n": len(base), "ef": ef, "recall@1": recall, "p50_us": wall})
                print(
                    f"  ef_search {ef:5d} recall@1 {recall:.4f} p50 {wall:.0f}us", file=sys.stderr, flush=True
                )
        del part
    return rows, sweep


def cachelm_paths(
    base: np.ndarray,
    queries: np.ndarray,
    query_texts: list[str],
    exact: np.ndarray,
    embedder: MiniLMEmbedder,
    backend: str,
) -> dict[str, Any]:
    """Search-only and lookup P50 through cachelm's own API, insert throughput, memory per entry."""
    out: dict[str, Any] = {"n": len(base)}
    embeddings = EmbeddingCache(MemoryStore(), embedder)

    def request(text: str) -> dict[str, Any]:
        return {"model": "gpt-x", "temperature": 0, "messages": [{"role": "user", "content": text}]}

    # HNSW first: RSS growth is only trustworthy for the first index built (later ones reuse freed memory).
    for name, make in (
        ("hnsw", lambda: HNSWIndex(base.shape[1], config=HNSWConfig(backend=backend))),
        ("flat", lambda: FlatIndex(base.shape[1])),
    ):
        gc.collect()
        before = rss_bytes()
        index = make()
        cache = SemanticCache(embedder=embeddings, index=index, rule=StaticThreshold(0.8))
        ctx = cache.query(request("x"), tenant="bench")
        assert ctx is not None
        t = time.perf_counter()
        for i, v in enumerate(base):
            cache.add_vector(
                v, tenant="bench", context_key=ctx.context_key, response_key=f"r{i}", entry_id=f"e{i}"
            )
        out[f"{name}_insert_per_s"] = len(base) / (time.perf_counter() - t)
        out[f"{name}_rss_bytes_per_entry"] = (rss_bytes() - before) / len(base)
        top1 = [index.search(q, tenant="bench", context_key=ctx.context_key)[0].entry_id for q in queries]
        out[f"{name}_recall@1"] = float(np.mean([t == f"e{e}" for t, e in zip(top1, exact, strict=True)]))
        out[f"{name}_search_p50_us"], out[f"{name}_search_cpu_p50_us"] = p50_us(
            lambda q, ix=index, key=ctx.context_key: ix.search(q, tenant="bench", context_key=key), queries
        )
        for text in query_texts[:10]:  # warm the whole path (allocator, tokenizer caches) before timing
            cache.search(request(text + " warm"), tenant="bench")
        embeddings.store.clear()  # every lookup below embeds an unseen question (the expensive path)
        out[f"{name}_lookup_p50_us"], out[f"{name}_lookup_cpu_p50_us"] = p50_us(
            lambda text, c=cache: c.search(request(text), tenant="bench"), query_texts
        )
        del cache, index
    out["embed_p50_us"], out["embed_cpu_p50_us"] = p50_us(
        lambda text: embedder.embed([text + " ?"]), query_texts[:100]
    )
    with tempfile.TemporaryDirectory() as d:
        index = HNSWIndex(base.shape[1], config=HNSWConfig(backend=backend), path=Path(d) / "c.sqlite")
        k = min(len(base), 20_000)
        t = time.perf_counter()
        for i, v in enumerate(base[:k]):
            index.add([IndexEntry(entry_id=f"e{i}", tenant="b", context_key="c", response_key="r", vector=v)])
        out["persisted_insert_per_s"] = k / (time.perf_counter() - t)
        index.close()
    print(f"  cachelm n={len(base)}: {out}", file=sys.stderr, flush=True)
    return out


def plot(lib_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    sizes = sorted({r["n"] for r in lib_rows})
    for ax, key, label in (
        (axes[0], "p50_us", "query P50 (µs)"),
        (axes[1], "build_per_s", "build (vectors/s)"),
        (axes[2], "recall@1", "recall@1 vs exact"),
    ):
        width = 0.8 / len(BACKENDS)
        for j, backend in enumerate(BACKENDS):
            vals = [next(r[key] for r in lib_rows if r["backend"] == backend and r["n"] == n) for n in sizes]
            ax.bar(np.arange(len(sizes)) + j * width, vals, width, label=backend)
        ax.set_xticks(np.arange(len(sizes)) + width, [f"{n // 1000}K" for n in sizes])
        ax.set_title(label)
        if key == "recall@1":
            ax.set_ylim(0.9, 1.0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"HNSW libraries, MiniLM vectors, M={M} efC={EF_ADD} efS={EF_SEARCH}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--cache-dir", default=".cache/semantic_eval")
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--lookup-queries", type=int, default=100)
    p.add_argument("--backend", default="hnswlib", choices=BACKENDS, help="backend for the cachelm-path rows")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads for MiniLM (1 resists CPU contention)"
    )
    p.add_argument(
        "--checkpoint",
        default="default",
        help="MiniLM weights: 'default' (MiniLMEmbedder()'s), 'none' (published) or a checkpoint path",
    )
    p.add_argument(
        "--quantize", default="default", choices=("default", "yes", "no"), help="dynamic int8 MiniLM"
    )
    p.add_argument(
        "--ef-sweep",
        default="256,512,1024",
        help="ef_search values to compare (hnswlib, default M and ef_construction); '' to skip",
    )
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    import torch

    # On a shared 2-core VM, torch's spinning worker threads collapse under contention (seconds per query
    # seen with 2 threads while other jobs ran); one thread gives stable single-query latency.
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    embedder = make_embedder(args.checkpoint, args.quantize)
    real, names = real_vectors(Path(args.data), Path(args.cache_dir), embedder)
    perm = rng.permutation(len(real))
    held = perm[: args.queries]
    queries, query_texts = real[held], [names[i] for i in held[: args.lookup_queries]]
    pool = real[perm[args.queries :]]
    embedder.embed(["warm up"])
    lib_rows, paths, sweep = [], [], []
    efs = [int(x) for x in args.ef_sweep.split(",") if x]
    for n in (int(x) for x in args.sizes.split(",")):
        base, num_real = corpus(pool, n, rng)
        exact = np.argmax(queries @ base.T, axis=1)  # (q,) exact top-1
        print(f"n={n} ({num_real} real vectors)", file=sys.stderr, flush=True)
        libs, efs_rows = compare_libraries(base, queries, exact, efs)
        lib_rows += libs
        sweep += efs_rows
        row = cachelm_paths(base, queries, query_texts, exact, embedder, args.backend)
        row["real"] = num_real
        paths.append(row)
    others = []
    for label, checkpoint, quantize in VARIANTS:
        other = make_embedder(checkpoint, quantize)
        if other.model_id == embedder.model_id:
            continue
        other.embed(["warm up"])
        wall, cpu = p50_us(lambda text, e=other: e.embed([text + " ?"]), query_texts[:100])
        others.append(f"{label} (`{other.model_id}`) {wall / 1000:.2f} / {cpu / 1000:.2f} ms")
    text = render(lib_rows, paths, args, embedder.model_id, sweep) + (
        " Embedding P50 (wall / CPU) of the other MiniLM variants on the same questions: "
        + "; ".join(others)
        + ". Their accuracy is in the `semantic_eval*` sections."
    )
    print(text)
    if args.report:
        plot(lib_rows, DOCS_IMG / "semantic_ann.png")
        write_section("semantic_perf", text)
    return 0


VARIANTS = (
    ("published MiniLM, float32", "none", "no"),
    ("published MiniLM, int8", "none", "yes"),
    ("fine-tuned MiniLM, float32", "default", "no"),
    ("fine-tuned MiniLM, int8", "default", "yes"),
)


def make_embedder(checkpoint: str, quantize: str) -> MiniLMEmbedder:
    """MiniLMEmbedder on CPU; 'default' leaves that argument to MiniLMEmbedder's own default."""
    kwargs: dict[str, Any] = {"device": "cpu"}
    if checkpoint != "default":
        kwargs["checkpoint"] = None if checkpoint == "none" else Path(checkpoint)
    if quantize != "default":
        kwargs["quantize"] = quantize == "yes"
    return MiniLMEmbedder(**kwargs)


def render(
    lib_rows: list[dict[str, Any]],
    paths: list[dict[str, Any]],
    args: argparse.Namespace,
    model_id: str,
    sweep: list[dict[str, Any]] | None = None,
) -> str:
    flags = "" if args.checkpoint == "default" else f" --checkpoint {args.checkpoint}"
    flags += "" if args.quantize == "default" else f" --quantize {args.quantize}"
    lines = [
        "## Semantic cache: performance (`benchmarks/semantic_perf.py`)",
        "",
        f"Command: `python benchmarks/semantic_perf.py --data {args.data} --sizes {args.sizes}{flags} "
        f"--report`. Embedder: `{model_id}` (vectors and lookups). "
        f"Machine: {machine_description()} — a 2-core CI-class VM shared with other jobs while measuring, so "
        "absolute times are noisy; compare rows of one run. Vectors: the embedder's (384-d) of QQP "
        "questions; beyond the distinct real questions, noisy copies of them (see the script's docstring). "
        f"{args.queries} held-out real queries; lookups use {args.lookup_queries} of them, MiniLM on "
        f"{args.threads} torch thread(s), numpy BLAS on 1 thread. Memory: the serialised index size per "
        "entry is the dependable figure; RSS growth is measured in-process after earlier structures were "
        "freed, so later rows can reuse freed memory and read low.",
        "",
        f"### HNSW libraries on the same data (M={M}, ef_construction={EF_ADD}, ef_search={EF_SEARCH})",
        "",
        "| entries | library | build (vectors/s) | query P50 wall / CPU (µs) | recall@1 vs exact "
        "| index file (B/entry) | RSS growth (B/entry) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lib_rows:
        lines.append(
            f"| {r['n']:,} | {r['backend']} | {r['build_per_s']:,.0f} | "
            f"{r['p50_us']:.0f} / {r['cpu_p50_us']:.0f} | "
            f"{r['recall@1']:.4f} | {r['file_bytes_per_entry']:.0f} | {r['rss_bytes_per_entry']:.0f} |"
        )
    if sweep:
        efs = sorted({r["ef"] for r in sweep})
        lines += [
            "",
            f"ef_search (hnswlib, M={M}, ef_construction={EF_ADD}; the default is {EF_SEARCH}), recall@1 "
            "vs exact / query P50 wall (µs):",
            "",
            "| entries | " + " | ".join(f"ef {ef}" for ef in efs) + " |",
            "|---|" + "---|" * len(efs),
        ]
        for n in sorted({r["n"] for r in sweep}):
            by_ef = {r["ef"]: r for r in sweep if r["n"] == n}
            cells = [f"{by_ef[ef]['recall@1']:.4f} / {by_ef[ef]['p50_us']:.0f}" for ef in efs]
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![ANN libraries](img/semantic_ann.png)",
        "",
        f"### cachelm paths (HNSWIndex backend: {args.backend})",
        "",
        "Search-only = `VectorIndex.search`. Lookup = `SemanticCache.search(request)`: context key, MiniLM "
        "embedding of an unseen question on CPU (embedding-cache miss), search, decision. Wall = elapsed; "
        "CPU = process CPU time, i.e. the latency on an idle core (wall adds waiting for a core on this "
        "shared VM).",
        "",
        "| entries (real) | index | search P50 wall / CPU (µs) | lookup P50 wall / CPU (ms) | recall@1 "
        "| insert (entries/s) | RSS growth (B/entry) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in paths:
        for name in ("flat", "hnsw"):
            lines.append(
                f"| {r['n']:,} ({r['real']:,}) | {name} | {r[f'{name}_search_p50_us']:.0f} / "
                f"{r[f'{name}_search_cpu_p50_us']:.0f} | {r[f'{name}_lookup_p50_us'] / 1000:.2f} / "
                f"{r[f'{name}_lookup_cpu_p50_us'] / 1000:.2f} | {r[f'{name}_recall@1']:.4f} | "
                f"{r[f'{name}_insert_per_s']:,.0f} | {r[f'{name}_rss_bytes_per_entry']:.0f} |"
            )
    lines += [
        "",
        "MiniLM embedding alone (one short question, CPU), P50 wall / CPU: "
        + ", ".join(f"{r['embed_p50_us'] / 1000:.2f} / {r['embed_cpu_p50_us'] / 1000:.2f} ms" for r in paths)
        + ". Persisted HNSWIndex insert (SQLite WAL journal, one entry per transaction): "
        + ", ".join(f"{r['persisted_insert_per_s']:,.0f}/s" for r in paths)
        + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
