"""`cachelm c2c train|eval|generate`: the command-line face of cache-to-cache communication.

This is an entry point, so it is the one place that turns arguments into settings; errors from the library
(CacheLMError) become a one-line message and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachelm.c2c.data import PROMPT_STYLES
from cachelm.errors import CacheLMError

_SETS = ("arc_easy", "arc_challenge", "openbookqa")


def _models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--receiver", default="smollm2", help="packaged name, .gguf file or model directory")
    p.add_argument("--sharer", default="gemma3", help="packaged name, .gguf file or model directory")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachelm c2c", description="Cache-to-cache communication.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a fuser (both models frozen)")
    _models(t)
    t.add_argument(
        "--data", type=Path, required=True, help="the shared data folder (arc/, openbookqa/, instruct/)"
    )
    t.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    t.add_argument("--control", action="store_true", help="fair control: the receiver is its own sharer")
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--hidden", type=int, default=192)
    t.add_argument("--mlp-layers", type=int, default=2)
    t.add_argument("--layer-map", choices=("terminal", "uniform"), default="terminal")
    t.add_argument(
        "--fuse-span",
        choices=("context", "all"),
        default="context",
        help="'context': fuse the prompt's context once (C2C paper); 'all': fuse every position",
    )
    t.add_argument(
        "--token-alignment",
        choices=("last", "mean", "causal"),
        default=None,
        help="default: 'last' for --fuse-span context, 'causal' (required) for all",
    )
    t.add_argument("--sharer-positions", choices=("receiver", "own"), default="receiver")
    t.add_argument(
        "--mc-weight",
        type=float,
        default=0.0,
        help="weight of the cross-entropy over each question's options",
    )
    t.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        help="weight of the KL from the sharer alone's option distribution (distillation of its judgment)",
    )
    t.add_argument("--instructions", type=int, default=5000, help="Alpaca examples to mix in")
    t.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="plain",
        help="options: list each question's options in the prompt (stored in the checkpoint; eval reuses it)",
    )
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="option log-likelihood accuracy: receiver alone and with the fuser")
    _models(e)
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--sets", default=",".join(_SETS))
    e.add_argument("--limit", type=int, default=None, help="questions per set")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default=None,
        help="default: the one the fuser was trained with",
    )

    g = sub.add_parser("generate", help="stream the receiver's answer on the fused cache")
    _models(g)
    g.add_argument("--checkpoint", type=Path, required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    return parser


def _train(args: argparse.Namespace) -> int:
    from cachelm.c2c import pair
    from cachelm.c2c.checkpoint import save_fuser
    from cachelm.c2c.data import load_training
    from cachelm.c2c.train import TrainConfig, train_fuser

    config = TrainConfig(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        mc_weight=args.mc_weight,
        distill_weight=args.distill_weight,
    )
    receiver = pair.load(args.receiver, device=args.device)
    sharer = receiver if args.control else pair.load(args.sharer, device=args.device)
    layers = None
    if args.control:
        # The control fuses the receiver layers the real pair would fuse, with the receiver's own KV.
        real = pair.load(args.sharer, device="cpu") if args.sharer != args.receiver else receiver
        layers = tuple(
            r for r, _ in pair.new_fuser(receiver, real, layer_map=args.layer_map).config.layer_map
        )
    fuser = pair.new_fuser(
        receiver,
        sharer,
        hidden_dim=args.hidden,
        mlp_layers=args.mlp_layers,
        layer_map=args.layer_map,
        receiver_layers=layers,
        token_alignment=args.token_alignment,
        sharer_positions=args.sharer_positions,
        fuse_span=args.fuse_span,
    )
    examples = load_training(args.data, instructions=args.instructions, prompt_style=args.prompt_style)
    info = train_fuser(
        pair.pipeline(receiver, sharer, fuser),
        examples,
        config,
        state_path=args.out.with_suffix(".state.pt"),
        progress=not args.no_progress,
    )
    info["prompt_style"] = args.prompt_style
    save_fuser(
        fuser,
        args.out,
        receiver_fingerprint=receiver.fingerprint,
        sharer_fingerprint=sharer.fingerprint,
        receiver_file_sha256=receiver.file_sha256,
        sharer_file_sha256=sharer.file_sha256,
        train_info=info,
    )
    print(json.dumps({k: v for k, v in info.items() if k != "config"}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cachelm.c2c import pair
    from cachelm.c2c.checkpoint import read_metadata
    from cachelm.c2c.data import load_test
    from cachelm.c2c.evaluate import score_questions

    meta = read_metadata(args.checkpoint)
    style = args.prompt_style or json.loads(meta.get("train", "{}")).get("prompt_style", "plain")
    receiver = pair.load(args.receiver, device=args.device)
    # A control checkpoint names the receiver as its sharer.
    sharer = (
        receiver if meta["sharer"] == receiver.fingerprint else pair.load(args.sharer, device=args.device)
    )
    fused = pair.pipeline(receiver, sharer, pair.load_checkpoint(args.checkpoint, receiver, sharer))
    alone = pair.pipeline(receiver)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in [s for s in args.sets.split(",") if s]:
        questions = load_test(args.data, name, style)[: args.limit]
        out[name] = {
            "receiver": score_questions(alone, questions, batch_size=args.batch_size).as_dict(),
            "fused": score_questions(fused, questions, batch_size=args.batch_size).as_dict(),
        }
        for v in out[name].values():
            del v["predictions"]
    print(json.dumps(out, indent=1))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cachelm.c2c import pair
    from cachelm.c2c.checkpoint import read_metadata

    meta = read_metadata(args.checkpoint)
    receiver = pair.load(args.receiver, device=args.device)
    sharer = (
        receiver if meta["sharer"] == receiver.fingerprint else pair.load(args.sharer, device=args.device)
    )
    fused = pair.pipeline(receiver, sharer, pair.load_checkpoint(args.checkpoint, receiver, sharer))
    for piece in fused.stream(args.prompt, args.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cachelm c2c` with `argv` (without the leading "c2c"); return the exit code."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        return _generate(args)
    except CacheLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
