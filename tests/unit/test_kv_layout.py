"""KVLayout: derived from model configs, validated, sizes exact."""

from __future__ import annotations

import pytest
import torch

from cachelm.engine.tiny import tiny_gemma3, tiny_llama
from cachelm.errors import ConfigError
from cachelm.kv.layout import KVLayout


def test_layout_of_llama_and_gemma3() -> None:
    llama = KVLayout.from_model(tiny_llama())
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert llama.sliding_windows == (None,) * 4 and llama.dtype == torch.float32
    assert llama.bytes_per_token == 4 * 2 * 2 * 16 * 4
    assert llama.block_shape(8) == (8, 4, 2, 2, 16)
    gemma = KVLayout.from_model(tiny_gemma3(sliding_window=16))
    assert gemma.sliding_windows == (16, 16, 16, 16, 16, None)


def test_layout_validation() -> None:
    with pytest.raises(ConfigError, match="`num_layers`"):
        KVLayout(num_layers=0, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=())
    with pytest.raises(ConfigError, match="`sliding_windows`"):
        KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=(None,))
    model = tiny_llama()
    model.config.layer_types = ["chunked_attention"] * 4
    with pytest.raises(ConfigError, match="layer types"):
        KVLayout.from_model(model)
