"""Replay the first steps of a C2C training run and report each step's loss and whether its gradients
were finite: the check behind "the all-position NaN needs the GPU kernels" in docs/C2C.md.

The run is c2c_eval.py's (same data, batch order, seed, fuser and TrainConfig for its arguments), so a
step here is the step of the same number there. Example (the all-position fair control of 2026-12-07,
on CPU in bfloat16; its step 13 was non-finite on the H100):

  python benchmarks/c2c_replay.py --receiver smollm2 --data ../shared/data --fuse-span all --steps 14
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receiver", default="smollm2")
    p.add_argument("--sharer", default=None, help="default: the receiver itself (the fair control)")
    p.add_argument("--sharer-layers", type=int, default=18, help="the real sharer's depth (its layer map)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--fuse-span", choices=("context", "all"), default="all")
    p.add_argument("--steps", type=int, default=14, help="steps to replay")
    p.add_argument("--run-steps", type=int, default=420, help="the replayed run's total steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from cachelm.c2c import data as c2c_data
    from cachelm.c2c import pair
    from cachelm.c2c.config import make_layer_map
    from cachelm.c2c.train import TrainConfig, train_fuser

    receiver = pair.load(args.receiver, device=args.device, dtype=getattr(torch, args.dtype))
    sharer = receiver if args.sharer is None else pair.load(args.sharer, device=args.device)
    options: dict[str, Any] = {"seed": args.seed, "fuse_span": args.fuse_span}
    if args.sharer is None:  # the control fuses the layers the real pair fuses
        layers = make_layer_map("terminal", receiver.shape.num_layers, args.sharer_layers)
        options["receiver_layers"] = tuple(r for r, _ in layers)
    fuser = pair.new_fuser(receiver, sharer, **options)
    examples = c2c_data.load_training(args.data, instructions=5000, prompt_style="plain")
    cfg = TrainConfig(steps=args.run_steps, batch_size=args.batch_size, save_every=10**9, seed=args.seed)

    print("| step | loss | gradients |\n|---|---|---|")

    def on_step(step: int, loss: float) -> None:
        # A skipped (non-finite) step leaves no gradients: train_fuser clears them.
        finite = any(q.grad is not None for q in fuser.parameters())
        print(f"| {step - 1} | {loss:.4f} | {'finite' if finite else 'NON-FINITE (skipped)'} |", flush=True)
        if step >= args.steps:
            raise _Stop

    torch.manual_seed(args.seed)  # the gates' Gumbel noise, as c2c_eval.py seeds it
    with contextlib.suppress(_Stop):
        train_fuser(pair.pipeline(receiver, sharer, fuser), examples, cfg, progress=False, on_step=on_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
