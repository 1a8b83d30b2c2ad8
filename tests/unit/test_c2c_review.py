"""Review findings for the C2C layer's CPU-side logic: each test failed before its fix.

Tiny random-weight models and in-process tokenizers from `test_c2c_support`; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from cachelm.c2c import pair
from cachelm.c2c.align import align_causal, align_tokens, encode_with_offsets, sharer_position_ids
from cachelm.c2c.checkpoint import read_metadata, save_fuser
from cachelm.errors import CheckpointError, ConfigError
from tests.unit.test_c2c_support import (
    randomize,
    receiver_model,
    receiver_tokenizer,
    rewrite_metadata,
    sharer_model,
    sharer_tokenizer,
)

# -- special tokens a tokenizer appends after the text -------------------------------------------------------
#
# Fast tokenizers report the span (0, 0) for every special token their post-processor adds, including an EOS
# appended after the text. Taken at its word, that EOS sat "at offset 0" and, being the last special there,
# passed for the BOS: receiver BOS mapped to it, and the causal rule let tokens read it — the sharer's view
# of the whole text, continuation included.


def _templated(base: Any, template: str, specials: list[str]) -> Any:
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    ids = [(name, backend.token_to_id(name)) for name in specials]
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        pad_token=base.pad_token,
        unk_token=base.unk_token,
    )


@cache
def sharer_tokenizer_with_eos() -> Any:
    """The test sharer's tokenizer, adding `<bos> … <eos>` (same vocabulary, so the same model reads it)."""
    return _templated(sharer_tokenizer(), "<bos> $A <eos>", ["<bos>", "<eos>"])


@cache
def receiver_tokenizer_with_eos() -> Any:
    """The test receiver's tokenizer, appending `<|endoftext|>` after the text."""
    return _templated(receiver_tokenizer(), "$A <|endoftext|>", ["<|endoftext|>"])


def test_an_appended_eos_reports_where_it_is() -> None:
    text = "Which café is 東京?"
    _, spans = encode_with_offsets(sharer_tokenizer_with_eos(), text)
    assert spans[0] == (0, 0)  # BOS before the text
    assert spans[-1] == (len(text), len(text))  # EOS after it, not (0, 0)


def test_receiver_bos_maps_to_the_sharer_bos_not_its_appended_eos() -> None:
    text = "Which café is 東京?"
    _, s_spans = encode_with_offsets(sharer_tokenizer_with_eos(), text)
    receiver_spans = [(0, 0), (0, 5)]  # a receiver with a BOS, then "Which"
    assert align_tokens(receiver_spans, s_spans) == [[0], [1]]


def test_sharer_positions_do_not_collapse_on_a_receiver_eos() -> None:
    # The receiver's appended EOS sat at "offset 0" too: the sharer's BOS took its position (the last one),
    # and the running maximum then gave every sharer token that last position.
    text = "Which café is 東京? grams"
    _, r_spans = encode_with_offsets(receiver_tokenizer_with_eos(), text)
    _, s_spans = encode_with_offsets(sharer_tokenizer(), text)
    positions = sharer_position_ids(r_spans, s_spans)
    assert positions[0] == 0 and positions == sorted(positions)
    assert len(set(positions)) > len(positions) // 2


def test_causal_alignment_never_reads_an_appended_eos() -> None:
    text = "Which café is 東京? grams of rock"
    s_tok = sharer_tokenizer_with_eos()
    r_ids, r_spans = encode_with_offsets(receiver_tokenizer(), text)
    s_ids, _, rows = align_causal(r_spans, s_tok, text)
    assert len(rows) == len(r_ids)
    eos = len(s_ids) - 1
    for (_, end), row in zip(r_spans, rows, strict=True):
        assert row, "BOS exists: every receiver token reads something"
        (j,) = row
        assert j != eos or end == len(text)
        prefix_ids, _ = encode_with_offsets(s_tok, text[:end])
        assert prefix_ids[: j + 1] == s_ids[: j + 1]  # the same tokens, so the same KV, as text[:end]
    # The rule still reads the sharer's words, not only its BOS, although every prefix now ends in EOS.
    assert max(r[0] for r in rows) > 0


@pytest.fixture(scope="module")
def eos_models() -> tuple[Any, Any]:
    return (
        pair.from_objects("tiny-llama", receiver_model(), receiver_tokenizer()),
        pair.from_objects("tiny-gemma3-eos", sharer_model(sliding_window=8), sharer_tokenizer_with_eos()),
    )


def test_fused_all_logits_do_not_depend_on_later_text_with_an_eos_appending_sharer(
    eos_models: tuple[Any, Any],
) -> None:
    fuser = pair.new_fuser(*eos_models, hidden_dim=16, token_alignment="causal", fuse_span="all")
    randomize(fuser)
    with torch.no_grad():
        fuser.gate_logits.fill_(1.0)
    fused = pair.pipeline(*eos_models, fuser.eval())
    tok = eos_models[0].tokenizer
    short = tok(" grams", add_special_tokens=False)["input_ids"]
    longer = tok(" grams of rock and", add_special_tokens=False)["input_ids"]
    assert longer[: len(short)] == short
    with torch.no_grad():
        a, _, _ = fused._continuation_logits(["Answer:"], [short])
        b, _, _ = fused._continuation_logits(["Answer:"], [longer])
    torch.testing.assert_close(a[0], b[0, : a.shape[1]], atol=1e-4, rtol=0)


# -- damaged checkpoint metadata: a CheckpointError, never a KeyError, a TypeError or a late failure ---------


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return (
        pair.from_objects("tiny-llama", receiver_model(), receiver_tokenizer()),
        pair.from_objects("tiny-gemma3", sharer_model(), sharer_tokenizer()),
    )


def _rewritten(models: tuple[Any, Any], path: Path, **changes: str | None) -> Path:
    """A real checkpoint of `models`, saved again with metadata keys changed (None: removed) and its
    checksum recomputed (unless changed too), so the check under test is reached, not the checksum's."""
    receiver, sharer = models
    save_fuser(
        pair.new_fuser(receiver, sharer, hidden_dim=16),
        path,
        receiver_fingerprint=receiver.fingerprint,
        sharer_fingerprint=sharer.fingerprint,
    )
    return rewrite_metadata(path, resign=True, **changes)


def _config_with(models: tuple[Any, Any], **fields: Any) -> str:
    raw = json.loads(pair.new_fuser(*models, hidden_dim=16).config.to_json())
    for key, value in fields.items():
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return json.dumps(raw)


def test_checkpoint_without_config_metadata(models: tuple[Any, Any], tmp_path: Path) -> None:
    path = _rewritten(models, tmp_path / "f.safetensors", config=None)
    with pytest.raises(CheckpointError, match="config"):  # was a bare KeyError
        pair.load_checkpoint(path, *models)


def test_checkpoint_without_sharer_metadata_fails_in_read_metadata(
    models: tuple[Any, Any], tmp_path: Path
) -> None:
    path = _rewritten(models, tmp_path / "f.safetensors", sharer=None)
    with pytest.raises(CheckpointError, match="sharer"):  # the CLI indexed meta["sharer"]: a KeyError
        read_metadata(path)


def test_checkpoint_with_malformed_train_metadata(models: tuple[Any, Any], tmp_path: Path) -> None:
    path = _rewritten(models, tmp_path / "f.safetensors", train="{not json")
    with pytest.raises(CheckpointError, match="`train`"):  # `c2c eval` parsed it: a JSONDecodeError
        read_metadata(path)


@pytest.mark.parametrize(
    "config",
    [
        "null",  # was AttributeError: 'NoneType' object has no attribute 'pop'
        '"config"',
        "{}",  # was a ConfigError about `text`, not naming the checkpoint
    ],
)
def test_checkpoint_with_a_config_that_is_not_a_config(
    models: tuple[Any, Any], tmp_path: Path, config: str
) -> None:
    path = _rewritten(models, tmp_path / "f.safetensors", config=config)
    with pytest.raises(CheckpointError, match=r"f\.safetensors"):
        pair.load_checkpoint(path, *models)


@pytest.mark.parametrize(
    "fields",
    [
        {"hidden_dim": 16.5},  # was a TypeError from torch
        {"hidden_dim": True},
        {"gate_init": "open"},  # was a ValueError from float()
        {"gate_init": math.nan},  # loaded, with every gate closed
    ],
)
def test_checkpoint_with_bad_config_values(models: tuple[Any, Any], tmp_path: Path, fields: Any) -> None:
    path = _rewritten(models, tmp_path / "f.safetensors", config=_config_with(models, **fields))
    with pytest.raises(CheckpointError, match="config"):
        pair.load_checkpoint(path, *models)


def test_checkpoint_config_for_other_layer_counts_fails_at_load(
    models: tuple[Any, Any], tmp_path: Path
) -> None:
    # The fingerprints match (they do not cover the config); the stored shapes do not. It used to load and
    # fail only at the first fuse, with a ConfigError that named no checkpoint.
    config = _config_with(models, receiver={"num_layers": 8})
    path = _rewritten(models, tmp_path / "f.safetensors", config=config)
    with pytest.raises(CheckpointError, match="receiver"):
        pair.load_checkpoint(path, *models)


# -- runtime input validation: a bare str is a sequence of str too -------------------------------------------


def _fused(models: tuple[Any, Any], **kw: Any) -> Any:
    fuser = pair.new_fuser(*models, hidden_dim=16, **kw)
    randomize(fuser)
    with torch.no_grad():
        fuser.gate_logits.fill_(1.0)
    return pair.pipeline(*models, fuser.eval())


@pytest.mark.parametrize("fuse_span", ["context", "all"])
def test_options_given_as_a_str_are_refused_not_scored_letter_by_letter(
    models: tuple[Any, Any], fuse_span: str
) -> None:
    kw = {"fuse_span": fuse_span, "token_alignment": "causal" if fuse_span == "all" else "last"}
    fused = _fused(models, **kw)
    with pytest.raises(ConfigError, match="`options`"):  # scored "y", "e", "s" as three options
        fused.score(["Question: Which gas?\nAnswer:"], ["yes"])
    with pytest.raises(ConfigError, match="`options`"):
        pair.pipeline(models[0]).score(["Question: Which gas?\nAnswer:"], ["yes"])


def test_a_prompt_given_as_a_str_is_refused_not_generated_letter_by_letter(models: tuple[Any, Any]) -> None:
    fused = _fused(models, fuse_span="all", token_alignment="causal")
    with pytest.raises(ConfigError, match="`prompts` must be a non-empty list of str"):
        fused.generate("Hi yo", 2)  # returned five completions, one per character
    with pytest.raises(ConfigError, match="`prompts` must be a non-empty list of str"):
        pair.pipeline(models[0]).generate("Question: Which gas?", 2)  # "item 'Q' gives … fewer than 2 tokens"
