"""A small CPU check of the option-level C2C objective (`cachelm.c2c.train.OptionObjective`): a C2C fuser
and its fair control trained the same short way, scored on the first questions of the ARC-Easy test split,
with the receiver and the sharer alone beside them. Directional only: the real run is the GPU one in
docs/C2C.md.

    python benchmarks/c2c_option_check.py --data ../shared/data --steps 150 --n 400   # ~30 min on 2 cores

Training data: the ARC-Easy *train* split only. Prints each method's accuracy, the paired bootstrap
difference C2C − control (points, 95% interval) and `c2c_eval.sharer_reliance` (does C2C follow the sharer
more than the control does?).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from c2c_eval import paired_bootstrap, sharer_reliance
    from cachelm.c2c import evaluate as ev
    from cachelm.c2c import pair
    from cachelm.c2c.data import load_test, load_training
    from cachelm.c2c.train import TrainConfig, train_fuser

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=400, help="ARC-Easy test questions scored")
    p.add_argument("--mc-weight", type=float, default=1.0)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    receiver = pair.load("smollm2", dtype=torch.bfloat16)
    sharer = pair.load("gemma3", dtype=torch.bfloat16)
    examples = [e for e in load_training(args.data, instructions=0) if e.source == "arc_easy"]
    test = load_test(args.data, "arc_easy")[: args.n]
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        mc_weight=args.mc_weight,
        distill_weight=args.distill_weight,
    )
    c2c = pair.new_fuser(receiver, sharer, hidden_dim=192)
    layers = tuple(r for r, _ in c2c.config.layer_map)
    control = pair.new_fuser(receiver, receiver, hidden_dim=192, receiver_layers=layers)
    predictions: dict[str, tuple[int, ...]] = {}
    for name, fuser, sh in (("c2c", c2c, sharer), ("control", control, receiver)):
        train_fuser(pair.pipeline(receiver, sh, fuser), examples, cfg, progress=False)
        predictions[name] = ev.score_questions(
            pair.pipeline(receiver, sh, fuser), test, batch_size=16
        ).predictions
    for name, model in (("receiver", receiver), ("sharer", sharer)):
        predictions[name] = ev.score_questions(pair.pipeline(model), test, batch_size=16).predictions
    answers = [q.answer for q in test]
    for name, preds in predictions.items():
        acc = sum(int(a == b) for a, b in zip(preds, answers, strict=True)) / len(answers)
        print(f"{name}: {100 * acc:.1f}% of {len(answers)}")
    d, lo, hi = paired_bootstrap(list(predictions["c2c"]), list(predictions["control"]), answers)
    print(f"C2C − control: {d:+.1f} points [{lo:+.1f}, {hi:+.1f}] ({time.perf_counter() - started:.0f} s)")
    runs = {m: {"arc_easy": {"predictions": list(predictions[m])}} for m in ("c2c", "control", "sharer")}
    print(sharer_reliance(runs["c2c"], runs["control"], runs["sharer"], {"arc_easy": answers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
