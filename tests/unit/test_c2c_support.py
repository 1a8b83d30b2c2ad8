"""Tiny real models and tokenizers for the C2C tests (random weights, tokenizers trained in-process).

Receiver: a Llama with a byte-level BPE tokenizer (no BOS; multi-byte characters split into byte pieces).
Sharer: a Gemma-3 text model with sliding-window layers and a different tokenizer (Metaspace "▁" BPE with a
BOS token), so the two split the same text differently.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide",
    "Question: What is the boiling point of water at sea level?\nAnswer: 100 degrees Celsius",
    "The café in 東京 serves crème brûlée and naïve jalapeño dishes. 😀 emoji!",
    "Energy from the sun reaches Earth as light. Magnets attract iron. Ice melts into water.",
    "A student measures the mass of a rock with a balance, then records it in grams.",
] * 20


@cache
def receiver_tokenizer() -> Any:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@cache
def sharer_tokenizer() -> Any:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def receiver_model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(receiver_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_id=receiver_tokenizer().eos_token_id,
        pad_token_id=receiver_tokenizer().pad_token_id,
        bos_token_id=None,
    )
    model: Any = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def sharer_model(seed: int = 1, sliding_window: int = 8) -> Any:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(sharer_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=sharer_tokenizer().pad_token_id,
        eos_token_id=sharer_tokenizer().eos_token_id,
        bos_token_id=sharer_tokenizer().bos_token_id,
    )
    model: Any = Gemma3ForCausalLM(config)
    return model.eval().requires_grad_(False)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every parameter (the zero-initialised output layers included) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale / max(1, p.shape[-1]) ** 0.5)


def rewrite_metadata(path: Path, *, resign: bool = False, **changes: str | None) -> Path:
    """Save the checkpoint at `path` again, tensors unchanged, with metadata keys changed (None: removed).
    `resign`: recompute its checksum too (unless `changes` set it), so a check other than the checksum's
    is reached."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cachelm.c2c.checkpoint import checkpoint_digest

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    tensors = load_file(str(path))
    if resign and "xxh3_128" in meta and "xxh3_128" not in changes:
        meta["xxh3_128"] = checkpoint_digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return path
