"""The local generation engine: model loading (packaged GGUFs, local directories) and generation with the
KV prefix cache. Names are re-exported lazily (`cachelm models list` must not import transformers)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "cachelm.engine.engine",
    "GenerationResult": "cachelm.engine.engine",
    "SamplingParams": "cachelm.engine.engine",
    "StaticRunner": "cachelm.engine.static_runner",
    "TokenEvent": "cachelm.engine.engine",
    "build_prefix_cache": "cachelm.engine.engine",
    "load_model": "cachelm.engine.loader",
    "packaged_model_path": "cachelm.engine.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cachelm.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
