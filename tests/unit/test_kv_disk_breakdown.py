"""benchmarks/kv_disk_breakdown.py measures what it says: every block of the stored prefix, each stage,
and the whole load of that prefix (the numbers live in docs/BENCHMARKS.md, never in a timed test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.scripts import load_benchmark


def test_breakdown_times_every_stage_over_the_stored_blocks_and_renders_them(tmp_path: Path) -> None:
    bench = load_benchmark("kv_disk_breakdown")
    row = bench.measure(512, torch.device("cpu"), tmp_path, reps=1, threads=2)
    raw = 512 * 32 * 2 * 8 * 128 * 2  # tokens × layers × K/V × heads × head dim × bf16 bytes
    assert row["blocks"] == 2 and raw < row["bytes"] < raw * 1.01  # the files: the raw KV plus headers
    assert set(row["seconds"]) == {*bench.STAGES, "sum", *bench.CHECKS, *bench.LOADS}
    assert bench.LOADS == ("before", "load_1", "load", "load_sealed")
    assert all(s > 0 for s in row["seconds"].values())
    assert row["seconds"]["sum"] == pytest.approx(sum(row["seconds"][s] for s in bench.STAGES))
    results = {"machine": "test", "device": "cpu", "threads": 2, "reps": 1, "command": "c", "rows": [row]}
    text = bench.render(results)
    assert "| 512 | 0.07 GB |" in text and "the stages split as" in text
    assert "Encrypted at rest, the pooled load takes" in text and "XXH3-128 checks the blocks" in text
    del row["seconds"]["load_sealed"], row["seconds"]["xxh3"]  # an older run still renders, without them
    older = bench.render(results)
    assert "encrypted" not in older and "XXH3" not in older
