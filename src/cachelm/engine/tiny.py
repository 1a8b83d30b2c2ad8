"""Tiny random-weight models and a tiny BPE tokenizer, built from configs with no download.

Tests, demos and CI use these: a model of a few hundred thousand parameters runs a forward pass in
milliseconds on CPU, yet has the same cache machinery as the real models (Llama: full attention only;
Gemma-3: sliding-window layers mixed with full-attention layers, and a different rope base per layer type).
"""

from __future__ import annotations

from typing import Any

# A fixed corpus so the tokenizer (and therefore every token id in a test) is the same on every machine.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. There is a theory that the theatre is there. "
    "A cache keeps the results of earlier work so that later requests are answered faster. "
    "Keys and values of every attention layer are stored in blocks of tokens; a prefix that was seen "
    "before is loaded instead of being computed again. The user asks a question and the assistant "
    "answers it. Hello, how are you today? I am fine, thank you. What is the capital of France? Paris. "
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" "
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on a fixed corpus, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # Called through Any: transformers' own annotations are partial and fail mypy --strict.
    fast_cls: Any = PreTrainedTokenizerFast
    fast = fast_cls(tokenizer_object=tok, pad_token="<pad>", bos_token="<|bos|>", eos_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 384, *, seed: int = 0, **overrides: Any) -> Any:
    """A 4-layer Llama (GQA: 4 query heads, 2 KV heads of 16) with random weights, float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(LlamaConfig(**settings))
    return model.eval()


def tiny_gemma3(vocab_size: int = 384, *, sliding_window: int = 16, seed: int = 0, **overrides: Any) -> Any:
    """A 6-layer Gemma-3 (5 sliding-window layers of `sliding_window` tokens, then 1 full), random weights."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": sliding_window,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "attn_implementation": "sdpa",
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    model: Any = Gemma3ForCausalLM(Gemma3TextConfig(**settings))
    return model.eval()
