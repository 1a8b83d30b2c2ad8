"""Cache-to-cache communication: a sharer model's KV cache projected into a receiver's (docs/C2C.md).

Light names (config, alignment) import eagerly; names that need torch/transformers load on first use, so
`import cachelm.c2c` (and the CLI's argument parsing) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from cachelm.c2c.align import align_tokens, sharer_position_ids
from cachelm.c2c.config import FuserConfig, ModelShape, make_layer_map

_LAZY = {
    "C2CFuser": "cachelm.c2c.fuser",
    "C2CPipeline": "cachelm.c2c.runtime",
    "TrainConfig": "cachelm.c2c.train",
    "load_fuser": "cachelm.c2c.checkpoint",
    "model_fingerprint": "cachelm.c2c.checkpoint",
    "save_fuser": "cachelm.c2c.checkpoint",
    "train_fuser": "cachelm.c2c.train",
}

__all__ = [
    "C2CFuser",
    "C2CPipeline",
    "FuserConfig",
    "ModelShape",
    "TrainConfig",
    "align_tokens",
    "load_fuser",
    "make_layer_map",
    "model_fingerprint",
    "save_fuser",
    "sharer_position_ids",
    "train_fuser",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachelm.c2c' has no attribute {name!r}")
