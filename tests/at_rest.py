"""What a directory holds at rest, for the tests that scan raw files for erased or sealed bytes."""

from __future__ import annotations

from pathlib import Path


def raw_bytes(directory: Path) -> bytes:
    """Every file under `directory` (databases, WAL and shared-memory files, snapshots), as raw bytes."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())
