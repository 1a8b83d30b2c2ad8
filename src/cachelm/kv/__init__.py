"""KV prefix cache: block layout, codecs, tiers, the prefix cache, HF cache glue and non-prefix reuse.

Names are re-exported lazily (importing `cachelm.kv` does not import torch until a name is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlendResult": "cachelm.kv.blend",
    "Codec": "cachelm.kv.codecs",
    "DiskTier": "cachelm.kv.tiers",
    "EncodedBlock": "cachelm.kv.codecs",
    "Int4Codec": "cachelm.kv.codecs",
    "Int8Codec": "cachelm.kv.codecs",
    "KVLayout": "cachelm.kv.layout",
    "KVPrefixCache": "cachelm.kv.prefix_cache",
    "KVStats": "cachelm.kv.prefix_cache",
    "MemoryTier": "cachelm.kv.tiers",
    "PrefixMatch": "cachelm.kv.prefix_cache",
    "RawCodec": "cachelm.kv.codecs",
    "RedisTier": "cachelm.kv.tiers",
    "Segment": "cachelm.kv.blend",
    "Tier": "cachelm.kv.tiers",
    "blend_prefill": "cachelm.kv.blend",
    "make_codec": "cachelm.kv.codecs",
    "reposition": "cachelm.kv.blend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cachelm.kv' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
