"""The committed C2C fusers on the CPU: do they answer as they did on the H100?

Both directions are checked: SmolLM2 reading Gemma-3 (`smollm2-from-gemma3` and its control) and Gemma-3
reading SmolLM2 (`gemma3-from-smollm2` and its control). For each, the C2C fuser and its fair control are
loaded from `checkpoints/c2c` into the packaged GGUF models on the CPU (float32). They score the first
`--limit` questions of each test set with c2c_eval.py's evaluation, the same code as on the GPU. The
answers are then compared question by question with the H100 run's answers in the results files
(bfloat16). Agreement below 100 % is expected where two options score within bfloat16 noise of each
other; the accuracies on the same questions should agree within a point or two.

    python benchmarks/c2c_cpu_check.py --data ../shared/data            # 2-core CPU: about 23 minutes
    python benchmarks/c2c_cpu_check.py --render docs/results/c2c_cpu_check.json

Writes docs/results/c2c_cpu_check.json and the BENCHMARKS.md section `c2c-cpu-check`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from c2c_eval import SET_LABELS, SETS

ROOT = Path(__file__).resolve().parent.parent
# (label, receiver, sharer, C2C checkpoint, control checkpoint, the H100 results)
DIRECTIONS = (
    (
        "SmolLM2 ← Gemma-3",
        "smollm2",
        "gemma3",
        "smollm2-from-gemma3",
        "smollm2-control-self",
        "c2c_results.json",
    ),
    (
        "Gemma-3 ← SmolLM2",
        "gemma3",
        "smollm2",
        "gemma3-from-smollm2",
        "gemma3-control-self",
        "c2c_reverse_results.json",
    ),
)


def compare(cpu: dict[str, Any], gpu: dict[str, Any], answers: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One row per method and set: accuracy on the CPU and on the H100 over the same questions, and the
    share of questions where both picked the same option."""
    rows = []
    for method in ("c2c", "control"):
        for s in SETS:
            mine = cpu[method][s]["predictions"]
            theirs = gpu[method][s]["predictions"][: len(mine)]
            truth = answers[s][: len(mine)]
            rows.append(
                {
                    "method": method,
                    "set": s,
                    "n": len(mine),
                    "cpu_acc": sum(p == t for p, t in zip(mine, truth, strict=True)) / len(mine),
                    "gpu_acc": sum(p == t for p, t in zip(theirs, truth, strict=True)) / len(mine),
                    "agree": sum(a == b for a, b in zip(mine, theirs, strict=True)) / len(mine),
                }
            )
    return rows


def run_direction(args: argparse.Namespace, direction: tuple[str, ...]) -> dict[str, Any]:
    """Evaluate one direction's two committed fusers on the CPU; their accuracy entries (with answers)."""
    _, receiver, sharer, c2c_name, control_name, _ = direction
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for method, name in (("c2c", c2c_name), ("control", control_name)):
            (out / f"{method}.safetensors").symlink_to(args.checkpoints / f"{name}.safetensors")
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "c2c_eval.py"),
            *("--receiver", receiver, "--sharer", sharer, "--data", str(args.data)),
            *("--out", tmp, "--checkpoint-dir", tmp, "--methods", "c2c,control", "--phases", "eval"),
            *("--limit", str(args.limit), "--latency-n", "0", "--device", "cpu"),
        ]
        subprocess.run(cmd, check=True)
        return dict(json.loads((out / "results.json").read_text())["accuracy"])


def render(results: dict[str, Any]) -> str:
    lines = [
        "## C2C on the CPU: the committed fusers against their H100 answers",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`",
        "",
        "The committed C2C fusers and fair controls of both directions, loaded into the packaged GGUF "
        f"models on the CPU (float32), score the first {results['limit']} questions of each test set; the "
        "H100 columns are the H100 run's answers (bfloat16) to the same questions, from the results files. "
        "*Same answer*: the share of questions where the CPU and the H100 picked the same option.",
        "",
        "| pair (receiver ← sharer) | method | set | n | CPU acc % | H100 acc % | same answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in results["directions"].items():
        for r in rows:
            lines.append(
                f"| {label} | {r['method']} | {SET_LABELS[r['set']]} | {r['n']} | {100 * r['cpu_acc']:.1f} | "
                f"{100 * r['gpu_acc']:.1f} | {100 * r['agree']:.1f} % |"
            )
    every = [r for rows in results["directions"].values() for r in rows]
    worst = max(abs(r["cpu_acc"] - r["gpu_acc"]) for r in every)
    agree = sum(r["agree"] * r["n"] for r in every) / sum(r["n"] for r in every)
    lines += [
        "",
        f"Over all {sum(r['n'] for r in every)} answers the CPU and the H100 agree on {100 * agree:.1f} %; "
        f"the largest accuracy difference on one row is {100 * worst:.1f} points.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "c2c")
    p.add_argument("--limit", type=int, default=200, help="questions per test set")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--render", type=Path, default=None, help="only rewrite the docs section from this JSON")
    args = p.parse_args(argv)
    from _report import machine_description, write_section

    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        if args.limit < 1 or not args.data.is_dir():
            p.error("--limit must be ≥ 1 and --data a folder holding the ARC and OpenBookQA test sets")
        from cachelm.c2c.data import load_test

        answers = {s: [q.answer for q in load_test(args.data, s)] for s in SETS}
        started = time.perf_counter()
        results = {
            "machine": machine_description(),
            "command": " ".join(["python benchmarks/c2c_cpu_check.py", *(argv or sys.argv[1:])]),
            "limit": args.limit,
            "directions": {},
        }
        for direction in DIRECTIONS:
            gpu = json.loads((ROOT / "benchmarks" / direction[5]).read_text())["accuracy"]
            cpu = run_direction(args, direction)
            results["directions"][direction[0]] = compare(cpu, gpu, answers)
        results["seconds"] = time.perf_counter() - started
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "c2c_cpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    md = render(results)
    print(md)
    write_section("c2c-cpu-check", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
