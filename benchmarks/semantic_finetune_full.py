"""Fine-tune every layer of all-MiniLM-L6-v2 on QQP pairs from a bundle (GPU; CPU for checks), choose by val.

    # on the GPU host (bundle from benchmarks/semantic_gpu_bundle.py, carried as .stage/semantic):
    python benchmarks/semantic_finetune_full.py train --bundle .stage/semantic --out $OUT
    # back here: join the returned parts into the shipped checkpoint
    python benchmarks/semantic_finetune_full.py join checkpoints/semantic/minilm-qqp.safetensors \\
        OUT/minilm-qqp-full.part-*.safetensors

`train` runs a small coordinate search over the settings of `cachelm.semantic.training.TrainConfig`,
starting from all six layers, 3 epochs, 256 pairs a step, lr 5e-5, CoSENT scale 20: one stage per setting
(learning rate, epochs, batch, position/type embeddings, layers, an in-batch ranking term, CoSENT scale,
seed), each value tried with the best settings so far. Every run starts from the base weights, trains on the
GPTCache pairs that share no question with MeanCache val/test, and is scored by the F1 of the best threshold
on **MeanCache val** — the only selection criterion; MeanCache test (at the val-calibrated threshold) is
reported, never used to choose. A run whose estimated time would pass `--budget-s` is skipped, and one
still training at `--deadline-s` is stopped (and dropped), so the call ends in time (both count from the
script's start); runs are ordered by expected value.

Written to `--out` as soon as known: ``results.json`` (every run's settings, training numbers and scores,
rewritten after each run) and the best run's checkpoint as parts of ≤ 15 MiB
(``minilm-qqp-full.part-<i>-of-<n>.safetensors``, float16, trained tensors only; see
`cachelm.semantic.finetuned`), replaced whenever a better run finishes.

`--set k=v,...` overrides settings of every run (e.g. ``--set limit=512,epochs=0.25,batch=32`` with
``--eval-limit 200 --device cpu`` checks the whole path on the CPU in a minute); a setting fixed there is not
searched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from cachelm.semantic.finetuned import (
    join_checkpoint_parts,
    part_path,
    read_checkpoint,
    save_checkpoint_parts,
)
from cachelm.semantic.training import (
    Bundle,
    TrainConfig,
    TrainingStopped,
    evaluate,
    read_bundle,
    round_to_float16,
    train,
    trained_tensors,
)

STEM = "minilm-qqp-full.safetensors"
# (setting, values) in order of expected value; each stage keeps the best value so far by val F1.
STAGES: list[tuple[str, list[Any]]] = [
    ("lr", [5e-5, 1e-4, 2e-5, 2e-4]),
    ("epochs", [3.0, 6.0, 1.0, 10.0]),
    ("batch", [256, 512, 128, 64]),
    ("embeddings", [False, True]),
    ("layers", [6, 4]),  # freezing the bottom two may regularise on 49k pairs
    ("in_batch", [0.0, 0.5]),
    ("scale", [20.0, 30.0]),
    ("seed", [0, 1, 2]),
]
DATA = (
    "GPTCache similiar_qqp_full.json minus pairs sharing a question with MeanCache val/test "
    "(cachelm.semantic.datasets.gptcache_split)"
)


def log(message: str) -> None:
    print(message, flush=True)


def parse_set(text: str | None) -> dict[str, Any]:
    """``k=v,k=v`` → TrainConfig overrides, each value parsed as the field's type."""
    if not text:
        return {}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"`--set`: unknown setting {key!r} (known: {', '.join(types)})")
        kind = str(types[key])
        if "bool" in kind:
            out[key] = value.lower() in ("1", "true", "yes")
        elif "int" in kind:
            out[key] = None if value == "none" else int(value)
        else:
            out[key] = float(value)
    return out


class Estimator:
    """Seconds a run will take, from the step times measured so far (per batch size)."""

    def __init__(self) -> None:
        self.step_s: dict[int, float] = {}
        self.eval_s = 0.0
        self.build_s = 0.0

    def record(self, batch: int, step_s: float, eval_s: float, build_s: float) -> None:
        self.step_s[batch] = step_s
        self.eval_s, self.build_s = max(self.eval_s, eval_s), max(self.build_s, build_s)

    def seconds(self, config: TrainConfig, pairs: int) -> float:
        if not self.step_s:
            return 0.0
        batch = min(config.batch, pairs)
        steps = max(1, round(max(1, pairs // batch) * config.epochs))
        nearest = min(self.step_s, key=lambda b: abs(b - batch))
        # a step costs at least as much as a smaller batch's (launch-bound) and grows with size beyond
        per_step = self.step_s[nearest] * max(1.0, batch / nearest)
        return steps * per_step + self.eval_s + self.build_s


def run_one(
    bundle: Bundle, config: TrainConfig, device: torch.device, eval_limit: int | None, deadline: float
) -> tuple[dict[str, Any], Any]:
    """Train and evaluate one config: (record for results.json, the TrainResult)."""
    started = time.perf_counter()
    result = train(bundle, config, device=device, log=log, deadline=deadline)
    build_s = time.perf_counter() - started - result.seconds
    round_to_float16(result)  # score exactly the weights the checkpoint will hold
    t = time.perf_counter()
    scores = evaluate(result.bert, bundle, device=device, limit=eval_limit)
    record = {
        "name": config.name,
        "config": dataclasses.asdict(config),
        "train": result.info(),
        "eval": scores,
        "eval_s": round(time.perf_counter() - t, 1),
        "build_s": round(build_s, 1),
        "step_s": result.seconds / result.steps,
    }
    return record, result


def save_best(out: Path, bundle: Bundle, record: dict[str, Any], result: Any, runs: int) -> list[Path]:
    """The run's trained tensors as checkpoint parts in `out`, replacing an earlier best's."""
    for old in out.glob(f"{Path(STEM).stem}.part-*"):
        old.unlink()
    info = {
        **record["train"],
        "data": DATA,
        "script": "benchmarks/semantic_finetune_full.py",
        "loss": "CoSENT" + (" + in-batch ranking" if record["config"]["in_batch"] else ""),
        "gptcache_pairs_removed_for_overlap": bundle.manifest["gptcache_pairs_removed_for_overlap"],
        "dtype": "float16",
        "device": device_name(),
        "selected_by": f"best-threshold F1 on MeanCache val, best of {runs} runs",
        "val_f1": round(record["eval"]["val_f1"], 4),
        "val_threshold": record["eval"]["threshold"],
        "test_f1_at_val_threshold": round(record["eval"]["test"]["f1"], 4),
    }
    return save_checkpoint_parts(
        out / STEM, trained_tensors(result), base_sha256=bundle.base_sha256, train_info=info
    )


def write_results(out: Path, results: dict[str, Any], started: float) -> None:
    results["seconds"] = round(time.perf_counter() - started, 1)
    tmp = out / "results.json.tmp"  # replaced whole: a call cut off mid-write still returns the last one
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sweep(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = read_bundle(Path(args.bundle))
    overrides = parse_set(args.set)
    pairs = min(len(bundle.pairs["train"]), overrides.get("limit") or len(bundle.pairs["train"]))
    log(
        f"device {device_name()}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"bundle {bundle.folder} ({pairs} training pairs); budget {args.budget_s:.0f} s"
    )
    best = TrainConfig(**overrides)
    stages = STAGES if args.sweep == "coordinate" else []
    # a setting fixed by --set is not searched
    planned = [("base", None)] + [(k, v) for k, vs in stages if k not in overrides for v in vs]
    results: dict[str, Any] = {
        "bundle": {k: v for k, v in bundle.manifest.items() if k != "files"},
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "selection": "best-threshold F1 on MeanCache val (test is reported, never used to choose)",
        "eval_limit": args.eval_limit,
        "runs": [],
        "skipped": [],
        "best": None,
    }
    done: dict[str, dict[str, Any]] = {}
    estimator = Estimator()
    best_f1 = -1.0
    for key, value in planned:
        config = best if key == "base" else dataclasses.replace(best, **{key: value})
        if config.name in done:
            continue
        elapsed = time.perf_counter() - started
        estimate = estimator.seconds(config, pairs)
        if done and elapsed + estimate > args.budget_s:  # the first run always runs
            log(f"skip {config.name}: ~{estimate:.0f} s would pass the budget ({elapsed:.0f} s used)")
            results["skipped"].append({"name": config.name, "estimate_s": round(estimate)})
            continue
        log(f"run {len(done) + 1}: {config.name} (estimate {estimate:.0f} s, {elapsed:.0f} s used)")
        try:
            record, result = run_one(bundle, config, device, args.eval_limit, started + args.deadline_s)
        except TrainingStopped as exc:
            log(f"  stopped: {exc}; no further runs")
            results["runs"].append({"name": config.name, "error": f"stopped: {exc}"})
            break
        except Exception as exc:  # one failing run (say, out of memory) must not lose the others
            log(f"  FAILED: {exc!r}")
            results["runs"].append({"name": config.name, "error": traceback.format_exc()[-2000:]})
            done[config.name] = {}
            write_results(out, results, started)
            continue
        done[config.name] = record
        results["runs"].append(record)
        estimator.record(config.batch, record["step_s"], record["eval_s"], record["build_s"])
        ev = record["eval"]
        log(
            f"  val F1 {ev['val_f1']:.4f} (threshold {ev['threshold']:.3f}); test F1 {ev['test']['f1']:.4f} "
            f"(oracle {ev['test_oracle_f1']:.4f}); loss {record['train']['final_loss_50']:.4f}; "
            f"train {record['train']['train_s']:.0f} s, eval {record['eval_s']:.0f} s"
        )
        if ev["val_f1"] > best_f1:
            best_f1, best = ev["val_f1"], config
            results["best"] = config.name
            paths = save_best(out, bundle, record, result, len(done))
            log(f"  new best: {', '.join(f'{p.name} ({p.stat().st_size / 2**20:.1f} MiB)' for p in paths)}")
        del result
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_results(out, results, started)
    write_results(out, results, started)
    ranked = sorted((r for r in results["runs"] if "eval" in r), key=lambda r: -r["eval"]["val_f1"])
    log("\nrun | val F1 | threshold | test F1 | test oracle F1 | train s")
    for r in ranked:
        ev = r["eval"]
        log(
            f"{r['name']} | {ev['val_f1']:.4f} | {ev['threshold']:.3f} | {ev['test']['f1']:.4f} | "
            f"{ev['test_oracle_f1']:.4f} | {r['train']['train_s']:.0f}"
        )
    log(f"best by val: {results['best']}; {time.perf_counter() - started:.0f} s in all")
    return 0 if ranked else 1


def join(args: argparse.Namespace) -> int:
    out = join_checkpoint_parts([Path(p) for p in args.parts], Path(args.out))
    info, tensors = read_checkpoint(out)
    log(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {info.sha256[:16]}…): "
        f"{len(tensors)} tensors, layers {info.train.get('layers_trained')}, "
        f"val F1 {info.train.get('val_f1')}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="coordinate search; best run's checkpoint parts + results.json")
    t.add_argument("--bundle", required=True, help="bundle folder (benchmarks/semantic_gpu_bundle.py)")
    t.add_argument("--out", required=True, help="folder for results.json and the checkpoint parts")
    t.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    t.add_argument("--budget-s", type=float, default=200.0, help="start no run estimated to end after this")
    t.add_argument("--deadline-s", type=float, default=240.0, help="stop a run still training at this time")
    t.add_argument("--sweep", choices=["coordinate", "none"], default="coordinate")
    t.add_argument("--set", default=None, help="settings for every run, e.g. epochs=1,batch=512")
    t.add_argument("--eval-limit", type=int, default=None, help="score only the first N val/test pairs")
    j = sub.add_parser("join", help="join checkpoint parts into one checkpoint")
    j.add_argument("out", help="the checkpoint to write, e.g. checkpoints/semantic/minilm-qqp.safetensors")
    j.add_argument("parts", nargs="+", help=f"the parts ({part_path(STEM, 1, 2).name}, …)")
    args = p.parse_args(argv)
    return sweep(args) if args.command == "train" else join(args)


if __name__ == "__main__":
    sys.exit(main())
