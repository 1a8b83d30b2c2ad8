"""Fine-tune the top layers of all-MiniLM-L6-v2 on QQP pairs disjoint from the evaluation (CPU).

(All six layers on a GPU: ``benchmarks/semantic_finetune_full.py``, from a bundle.)

    python benchmarks/semantic_finetune.py --data ../shared/data \
        --out checkpoints/semantic/minilm-qqp.safetensors

Data: GPTCache's 80,854 labelled QQP pairs minus every pair that shares a question (lower-cased,
whitespace-collapsed) with MeanCache val or test (`cachelm.semantic.datasets.gptcache_split`): MeanCache val
calibrates the threshold and MeanCache test measures F1, so neither may be seen in training.

Method (tractable on two CPU cores):
1. The bottom `6 - layers` transformer layers (and the embeddings) stay frozen, so their output for each
   distinct training question is computed once, without gradients, and kept in memory.
2. The top `layers` layers are trained on those cached states with mean pooling and L2 normalisation (the
   model's own head) and the CoSENT loss over each batch's pair cosines: for every (positive pair p,
   negative pair n) in the batch, ``log(1 + Σ exp(scale · (cos_n − cos_p)))``. It ranks duplicate pairs
   above non-duplicates globally, which is what a single cosine threshold needs.
3. AdamW, linear warm-up (10 %) then linear decay, one seed for shuffling, dropout and initial order.

The checkpoint holds only the trained layers in float16 (see `cachelm.semantic.finetuned`), with the base
model's file hash and this run's settings in its metadata. Evaluate it with
``cachelm eval semantic --data DIR --checkpoint PATH``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachelm.semantic.datasets import gptcache_split
from cachelm.semantic.embedder import minilm_model_path
from cachelm.semantic.finetuned import save_checkpoint
from cachelm.semantic.training import cosent_loss, warmup_linear


class Frozen:
    """Hidden states of the frozen bottom layers for each distinct text, variable length, float32."""

    def __init__(self, bert: Any, tokenizer: Any, texts: list[str], split: int, max_len: int) -> None:
        from transformers.masking_utils import create_bidirectional_mask

        self.index = {t: i for i, t in enumerate(texts)}
        self.states: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(order), 256):
                ids = order[start : start + 256]
                enc = tokenizer(
                    [texts[i] for i in ids],
                    truncation=True,
                    max_length=max_len,
                    padding=True,
                    return_tensors="pt",
                )
                h = bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
                mask = create_bidirectional_mask(
                    config=bert.config, inputs_embeds=h, attention_mask=enc["attention_mask"]
                )
                for layer in bert.encoder.layer[:split]:
                    h = layer(h, mask)
                lengths = enc["attention_mask"].sum(1).tolist()
                for row, i in enumerate(ids):
                    self.states[i] = h[row, : lengths[row]].clone()
                if start % 12_800 == 0:
                    print(
                        f"  frozen states {start}/{len(texts)} ({time.perf_counter() - started:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded states (b, t, d) and attention mask (b, t) of `texts`."""
        rows = [self.states[self.index[t]] for t in texts]
        width = max(len(r) for r in rows)
        out = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return out, mask


def top_forward(bert: Any, split: int, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm sentence vectors: the top layers on cached states, then masked mean pooling."""
    from transformers.masking_utils import create_bidirectional_mask

    attn = create_bidirectional_mask(config=bert.config, inputs_embeds=states, attention_mask=mask)
    h = states
    for layer in bert.encoder.layer[split:]:
        h = layer(h, attn)
    m = mask.unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data folder with qqp/ (see MANIFEST.md)")
    p.add_argument("--out", default="checkpoints/semantic/minilm-qqp.safetensors")
    p.add_argument("--layers", type=int, default=2, help="top transformer layers to train (1-6)")
    p.add_argument("--max-len", type=int, default=40, help="word pieces per question in training")
    p.add_argument("--batch", type=int, default=64, help="pairs per step")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale", type=float, default=20.0, help="CoSENT scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--limit", type=int, default=None, help="train on a seeded sample of this many pairs (CPU budget)"
    )
    p.add_argument(
        "--save-every", type=int, default=0, help="also write <out>.step<N>.safetensors every N steps"
    )
    args = p.parse_args(argv)
    if not 1 <= args.layers <= 6:
        p.error("`--layers` must be in 1..6")
    if args.batch < 2 or args.epochs <= 0 or args.lr <= 0 or args.max_len < 8:
        p.error("`--batch` >= 2, `--epochs` > 0, `--lr` > 0 and `--max-len` >= 8 are required")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    split_data = gptcache_split(Path(args.data))
    train = split_data.train
    print(
        f"GPTCache pairs: {len(train) + len(split_data.held_out)}; held out (share a question with MeanCache "
        f"val/test, {split_data.meancache_questions} questions): {len(split_data.held_out)}; training: "
        f"{len(train)} ({int(train.labels.sum())} duplicates)",
        file=sys.stderr,
        flush=True,
    )
    pairs = list(zip(train.a, train.b, train.labels.tolist(), strict=True))
    if args.limit is not None:
        pairs = random.Random(args.seed).sample(pairs, min(args.limit, len(pairs)))

    from sentence_transformers import SentenceTransformer

    base_dir = minilm_model_path()
    model = SentenceTransformer(base_dir, device="cpu")
    bert, tokenizer = model[0].auto_model, model[0].tokenizer
    split = 6 - args.layers
    texts = sorted({t for a, b, _ in pairs for t in (a, b)})
    t0 = time.perf_counter()
    bert.eval()
    frozen = Frozen(bert, tokenizer, texts, split, args.max_len)
    frozen_s = time.perf_counter() - t0

    trainable = [p_ for layer in bert.encoder.layer[split:] for p_ in layer.parameters()]
    for param in bert.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    steps_per_epoch = len(pairs) // args.batch
    total = max(1, int(steps_per_epoch * args.epochs))
    warmup = max(1, total // 10)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total, warmup))
    for layer in bert.encoder.layer[split:]:
        layer.train()
    info = {
        "data": "GPTCache similiar_qqp_full.json minus pairs sharing a question with MeanCache val/test",
        "pairs": len(pairs),
        "gptcache_pairs_removed_for_overlap": len(split_data.held_out),
        "layers_trained": list(range(split, 6)),
        "loss": "CoSENT",
        "scale": args.scale,
        "max_len": args.max_len,
        "batch": args.batch,
        "epochs": args.epochs,
        "steps": total,
        "lr": args.lr,
        "seed": args.seed,
        "frozen_states_s": round(frozen_s),
        "dtype": "float16",
    }
    rng = random.Random(args.seed)
    order: list[int] = []
    losses: list[float] = []
    t1 = time.perf_counter()
    for step in range(total):
        if not order:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        batch = [pairs[order.pop()] for _ in range(min(args.batch, len(order)))]
        states, mask = frozen.batch([a for a, _, _ in batch] + [b for _, b, _ in batch])
        vectors = top_forward(bert, split, states, mask)
        n = len(batch)
        cos = (vectors[:n] * vectors[n:]).sum(-1)
        labels = torch.tensor([y for _, _, y in batch], dtype=torch.float32)
        loss = cosent_loss(cos, labels, args.scale)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if step % 50 == 0 or step == total - 1:
            print(
                f"  step {step}/{total} loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t1:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            out = Path(args.out)
            partial = out.with_name(f"{out.stem}.step{step + 1}{out.suffix}")
            save(bert, split, partial, base_dir, {**info, "steps": step + 1, "partial_of": total})
    train_s = time.perf_counter() - t1
    info.update(
        {
            "final_loss_50": float(np.mean(losses[-50:])),
            "train_s": round(train_s),
        }
    )
    out = save(bert, split, Path(args.out), base_dir, info)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {info}", file=sys.stderr)
    return 0


def save(bert: Any, split: int, path: Path, base_dir: str, info: dict[str, Any]) -> Path:
    """The trained top layers (float16) as a checkpoint at `path`."""
    state = bert.state_dict()
    prefixes = tuple(f"encoder.layer.{i}." for i in range(split, 6))
    tensors = {k: v.to(torch.float16) for k, v in state.items() if k.startswith(prefixes)}
    return save_checkpoint(path, tensors, base_dir=base_dir, train_info=info)


if __name__ == "__main__":
    raise SystemExit(main())
