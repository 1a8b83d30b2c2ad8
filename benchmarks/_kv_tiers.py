"""KV tiers as the GPU benchmarks build them, and the bandwidth at which each one's bytes reach the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def make_tier(kind: str, codec: str, *, capacity: int, device: str, folder: Path) -> Any:
    """A tier of `kind` ("gpu", "cpu-pinned" or "disk", the latter under `folder`) storing with `codec`.
    The CPU tier is pinned where CUDA exists (`MemoryTier` skips pinning otherwise)."""
    from cachelm.kv.codecs import make_codec
    from cachelm.kv.tiers import DiskTier, MemoryTier

    c = make_codec(codec)
    if kind == "gpu":
        return MemoryTier(capacity_bytes=capacity, device=device, codec=c)
    if kind == "cpu-pinned":
        return MemoryTier(capacity_bytes=capacity, device="cpu", pin=True, codec=c)
    if kind == "disk":
        return DiskTier(folder / f"disk-{codec}-{time.monotonic_ns()}", capacity_bytes=capacity, codec=c)
    raise ValueError(f"unknown tier kind {kind!r}")


def file_read_bytes_per_s(folder: Path, timed: Callable[[Callable[[], Any]], float]) -> float:
    """Reading files through the page cache, as the disk tier reads its blocks: 32 files of 4 MiB."""
    piece = bytes(4 << 20)
    paths = [folder / f"bw{i}.bin" for i in range(32)]
    for p in paths:
        p.write_bytes(piece)
    seconds = timed(lambda: [p.read_bytes() for p in paths])
    for p in paths:
        p.unlink()
    return len(paths) * len(piece) / seconds


def disk_to_device_bytes_per_s(read: float, host_to_device: float) -> float:
    """A disk hit reads the file, then copies it up: the two bandwidths in series."""
    return 1 / (1 / read + 1 / host_to_device)
