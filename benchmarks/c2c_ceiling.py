"""How much could the sharer add at all? Score-level ensembles as a yardstick for C2C − control.

C2C's last target asks the fuser to beat its fair control (the same fuser, the receiver as its own
sharer) by 2 points of ARC-Easy. This script asks whether that much is in the sharer to begin with. For
every ARC-Easy question it scores each option (summed log-probability, as the evaluation does) with the
receiver alone, the sharer alone, the committed control and the committed C2C pair, then mixes scores:

    score(option) = score_A(option) + w · score_sharer(option)

with w chosen on the dev split (a grid from 0 to 3) and applied to the test split. `control + w·sharer`
is a late-fusion ensemble: it reads the sharer's whole judgement of every option, which context-only
fusion never sees, and needs both models at answer time. Its gain over the control is a yardstick (not
a bound) for what fusing the sharer's cache adds on top of task training; `c2c + w·sharer` shows what
the sharer still knows that C2C did not take in.

    python benchmarks/c2c_ceiling.py --data ../shared/data   # score (2-core CPU: about 45 min), then report
    python benchmarks/c2c_ceiling.py --phases report         # report from the saved scores

Scores go to benchmarks/c2c_ceiling.json; the report to docs/BENCHMARKS.md (section `c2c-ceiling`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("receiver", "sharer", "control", "c2c")
SPLITS = ("Dev", "Test")
GRID = [round(0.05 * i, 2) for i in range(61)]  # w in 0 … 3
SCORES = Path(__file__).resolve().parent / "c2c_ceiling.json"


def score_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Option scores of every method on ARC-Easy dev and test: {split: {method: [[score per option]]}}."""
    from tqdm import tqdm

    from cachelm.c2c import pair
    from cachelm.c2c.data import load_questions

    receiver = pair.load(args.receiver, device=args.device)
    sharer = pair.load(args.sharer, device=args.device)
    ckpt = args.checkpoint_dir
    pipes = {
        "receiver": pair.pipeline(receiver),
        "sharer": pair.pipeline(sharer),
        "control": pair.pipeline(
            receiver,
            receiver,
            pair.load_checkpoint(ckpt / "smollm2-control-self.safetensors", receiver, receiver),
        ),
        "c2c": pair.pipeline(
            receiver, sharer, pair.load_checkpoint(ckpt / "smollm2-from-gemma3.safetensors", receiver, sharer)
        ),
    }
    out: dict[str, Any] = {"device": args.device, "scores": {}, "answers": {}}
    started = time.perf_counter()
    for split in SPLITS:
        questions = load_questions(args.data, "arc_easy", split)[: args.limit]
        out["answers"][split] = [q.answer for q in questions]
        for method, pipe in pipes.items():
            rows: list[list[float]] = []
            for i in tqdm(range(0, len(questions), args.batch), desc=f"{split} {method}", mininterval=30):
                chunk = questions[i : i + args.batch]
                rows += pipe.score([q.prompt for q in chunk], [q.options for q in chunk])
            out["scores"].setdefault(split, {})[method] = [[round(x, 4) for x in r] for r in rows]
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _pick(scores: list[list[float]]) -> list[int]:
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def mix(a: list[list[float]], b: list[list[float]], w: float) -> list[int]:
    """Predictions of score_a + w · score_b, question by question."""
    return _pick([[x + w * y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)])


def accuracy(pred: list[int], answers: list[int]) -> float:
    return 100 * sum(p == y for p, y in zip(pred, answers, strict=True)) / len(answers)


def best_weight(a: list[list[float]], b: list[list[float]], answers: list[int]) -> float:
    """The grid's w with the highest accuracy of a + w·b on these (dev) questions; the smallest on ties."""
    return max(GRID, key=lambda w: (accuracy(mix(a, b, w), answers), -w))


def _features(a: list[list[float]], b: list[list[float]]) -> tuple[Any, Any]:
    """Per option: both models' log-probabilities over the question's options, alone and times each
    model's confidence (its top option's probability), so the fit can trust the sharer more where the
    receiver is unsure. Returns features (Q, K, 6) padded to K options and the mask of real options."""
    import torch

    k = max(len(r) for r in a)
    feats = torch.zeros(len(a), k, 6)
    mask = torch.zeros(len(a), k, dtype=torch.bool)
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        la = torch.log_softmax(torch.tensor(ra, dtype=torch.float64), 0).float()
        lb = torch.log_softmax(torch.tensor(rb, dtype=torch.float64), 0).float()
        ca, cb = la.exp().max(), lb.exp().max()
        feats[i, : len(ra)] = torch.stack([la, lb, la * ca, lb * ca, la * cb, lb * cb], dim=1)
        mask[i, : len(ra)] = True
    return feats, mask


def stack(
    dev_a: list[list[float]],
    dev_b: list[list[float]],
    dev_y: list[int],
    test_a: list[list[float]],
    test_b: list[list[float]],
) -> tuple[list[int], list[int]]:
    """A confidence-weighted late fusion fitted on dev: a conditional logit over each question's options
    on `_features` (6 weights, L2 0.01, L-BFGS). Predictions on dev (in-sample) and on test."""
    import torch

    x, mask = _features(dev_a, dev_b)
    y = torch.tensor(dev_y)
    theta = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (x @ theta).masked_fill(~mask, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.01 * theta.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(xs: torch.Tensor, m: torch.Tensor) -> list[int]:
        with torch.no_grad():
            return (xs @ theta).masked_fill(~m, float("-inf")).argmax(1).tolist()

    return predict(x, mask), predict(*_features(test_a, test_b))


def report(data: dict[str, Any]) -> str:
    from c2c_eval import paired_bootstrap

    dev, test = data["scores"]["Dev"], data["scores"]["Test"]
    dev_y, test_y = data["answers"]["Dev"], data["answers"]["Test"]
    control_test = _pick(test["control"])
    lines = [
        f"ARC-Easy, option log-likelihood (summed), dev n={len(dev_y)}, test n={len(test_y)}; "
        f"scored on {data['device']} in float32 ({data['seconds']:.0f} s). w is chosen on dev "
        f"(grid 0–3, step 0.05).",
        "",
        "| scores | w (dev) | dev acc % | test acc % | test Δ vs control [95% paired bootstrap] |",
        "|---|---|---|---|---|",
    ]
    rows: list[tuple[str, list[int], list[int], str]] = [
        (m, _pick(dev[m]), _pick(test[m]), "—") for m in METHODS
    ]
    for base in ("receiver", "control", "c2c"):
        w = best_weight(dev[base], dev["sharer"], dev_y)
        rows.append(
            (
                f"{base} + w·sharer",
                mix(dev[base], dev["sharer"], w),
                mix(test[base], test["sharer"], w),
                f"{w:.2f}",
            )
        )
    dev_pred, test_pred = stack(dev["control"], dev["sharer"], dev_y, test["control"], test["sharer"])
    rows.append(("control ⊕ sharer, confidence-weighted (fitted on dev)", dev_pred, test_pred, "6 weights"))
    for name, dev_pred, test_pred, w in rows:
        d, lo, hi = paired_bootstrap(test_pred, control_test, test_y)
        gap = "—" if name == "control" else f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        lines.append(
            f"| {name} | {w} | {accuracy(dev_pred, dev_y):.1f} | {accuracy(test_pred, test_y):.1f} | {gap} |"
        )
    lines += [
        "",
        "`control + w·sharer` reads the sharer's score of every option at answer time (two models, every "
        "option through both); context-only C2C passes only the sharer's cache of the question. Its gain "
        "over the control is a yardstick for what the sharer can add on top of task training, not a bound: "
        "a fuser may combine the two models' knowledge otherwise than by adding scores. The "
        "confidence-weighted row lets the weights depend on how sure each model is (a conditional logit "
        "over the options on both models' log-probabilities, alone and times each model's top "
        "probability, fitted on dev: its dev accuracy is in-sample).",
        "Command: `python benchmarks/c2c_ceiling.py --data ../shared/data` (scores saved to "
        "`benchmarks/c2c_ceiling.json`; `--phases report` re-renders from them).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receiver", default="smollm2")
    p.add_argument("--sharer", default="gemma3")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/c2c"))
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="questions per split (debugging)")
    p.add_argument("--phases", default="score,report")
    p.add_argument("--scores", type=Path, default=SCORES)
    p.add_argument("--section", default="c2c-ceiling", help="BENCHMARKS.md section ('' to only print)")
    args = p.parse_args(argv)
    phases = set(args.phases.split(","))
    if not phases <= {"score", "report"}:
        p.error(f"--phases takes score and/or report, got {args.phases!r}")
    if "score" in phases:
        args.scores.write_text(json.dumps(score_phase(args), separators=(",", ":")) + "\n")
    data = json.loads(args.scores.read_text())
    if "report" in phases:
        from _report import machine_description, write_section

        text = report(data)
        print(text)
        if args.section:
            header = (
                "## C2C — how much could the sharer add? (score-level ensembles, ARC-Easy)\n\n"
                f"Machine: {machine_description()}.\n\n"
            )
            write_section(args.section, header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
