"""Zero-sharer ablation: does a trained fuser use what the sharer's cache says?

Scores the first `--n` ARC-Easy test questions with the fuser as trained, then with the sharer's KV replaced
by zeros before fusion, and prints both accuracies and how often the two pick the same option.

  python benchmarks/c2c_ablate.py --checkpoint checkpoints/c2c/smollm2-from-gemma3.safetensors \\
      --data ../shared/data --n 400
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receiver", default="smollm2")
    p.add_argument("--sharer", default="gemma3")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from cachelm.c2c import pair
    from cachelm.c2c.data import load_test
    from cachelm.c2c.evaluate import score_questions

    receiver = pair.load(args.receiver, device=args.device)
    sharer = pair.load(args.sharer, device=args.device)
    fuser = pair.load_checkpoint(args.checkpoint, receiver, sharer)
    questions = load_test(args.data, "arc_easy")[: args.n]
    full = score_questions(pair.pipeline(receiver, sharer, fuser), questions, batch_size=16)

    fuse = fuser.fuse

    def zero_sharer(receiver_kv: Any, sharer_kv: Any, alignment: torch.Tensor) -> Any:
        return fuse(
            receiver_kv, [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in sharer_kv], alignment
        )

    fuser.fuse = zero_sharer  # type: ignore[method-assign,assignment]
    zero = score_questions(pair.pipeline(receiver, sharer, fuser), questions, batch_size=16)
    same = sum(a == b for a, b in zip(full.predictions, zero.predictions, strict=True)) / len(questions)
    print(json.dumps({"n": len(questions), "c2c": full.acc, "zero_sharer": zero.acc, "same_answer": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
