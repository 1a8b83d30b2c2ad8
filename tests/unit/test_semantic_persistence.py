"""The persisted HNSW index survives restarts, SIGKILL, and missing or corrupt snapshot files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cachelm.errors import BackendError, ConfigError
from cachelm.semantic import FlatIndex, HNSWConfig, HNSWIndex, IndexEntry

DIM = 16
CONFIG = HNSWConfig(min_graph_size=16, expansion_search=256)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def entries(vecs: np.ndarray, start: int = 0, tenant: str = "t") -> list[IndexEntry]:
    return [
        IndexEntry(
            entry_id=f"e{start + i}", tenant=tenant, context_key="c", response_key=f"r{start + i}", vector=v
        )
        for i, v in enumerate(vecs)
    ]


def assert_same_answers(index: HNSWIndex, expected: list[IndexEntry], queries: np.ndarray) -> None:
    """`index` answers every query exactly like a flat index over `expected` (recompute == reuse)."""
    reference = FlatIndex(DIM)
    reference.add(expected)
    assert sorted(index.entry_ids()) == sorted(e.entry_id for e in expected)
    for tenant in {e.tenant for e in expected}:
        for q in queries:
            got = index.search(q, tenant=tenant, context_key="c", k=3)
            want = reference.search(q, tenant=tenant, context_key="c", k=3)
            assert [n.entry_id for n in got] == [n.entry_id for n in want]


@pytest.mark.parametrize("backend", ["hnswlib", "usearch", "faiss"])
def test_reopen_loads_snapshot_without_rebuild(tmp_path: Path, backend: str) -> None:
    config = HNSWConfig(backend=backend, min_graph_size=16, expansion_search=256)
    data = entries(vectors(100))
    ix = HNSWIndex(DIM, config=config, path=tmp_path / "cache.sqlite")
    ix.add(data)
    ix.close()
    files = {p.name for p in tmp_path.iterdir()}
    assert {"cache.sqlite.semantic.sqlite", "cache.sqlite.semantic.hnsw"} <= files
    again = HNSWIndex(DIM, config=config, path=tmp_path / "cache.sqlite")
    assert again.recovery == {"loaded": 1, "rebuilt": 0, "reconciled": 0, "corrupt": 0}
    assert_same_answers(again, data, vectors(20, seed=1))
    again.close()


def test_missing_or_corrupt_snapshot_is_rebuilt(tmp_path: Path) -> None:
    data = entries(vectors(80))
    ix = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.sqlite")
    ix.add(data)
    ix.close()
    snap = tmp_path / "cache.sqlite.semantic.hnsw"
    (graph,) = snap.glob("*.graph")
    graph.write_bytes(b"\x00garbage" * 10)
    again = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.sqlite")
    assert again.recovery["rebuilt"] == 1
    assert_same_answers(again, data, vectors(20, seed=2))
    again.close()
    (snap / "manifest.json").unlink()
    third = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "cache.sqlite")
    assert third.recovery["rebuilt"] == 1
    assert_same_answers(third, data, vectors(20, seed=3))
    third.close()


def test_snapshot_of_other_settings_is_not_trusted(tmp_path: Path) -> None:
    ix = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "c.sqlite")
    ix.add(entries(vectors(40)))
    ix.close()
    other = HNSWConfig(backend="faiss", min_graph_size=16, expansion_search=256)
    again = HNSWIndex(DIM, config=other, path=tmp_path / "c.sqlite")
    assert again.recovery["rebuilt"] == 1
    assert_same_answers(again, entries(vectors(40)), vectors(10, seed=4))
    again.close()


def test_dim_is_persisted_and_checked(tmp_path: Path) -> None:
    HNSWIndex(DIM, config=CONFIG, path=tmp_path / "c.sqlite").close()
    with pytest.raises(ConfigError, match="`dim`"):
        HNSWIndex(DIM * 2, config=CONFIG, path=tmp_path / "c.sqlite")


def test_one_process_owns_the_files(tmp_path: Path) -> None:
    first = HNSWIndex(DIM, config=CONFIG, path=tmp_path / "c.sqlite")
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from cachelm.semantic import HNSWIndex; HNSWIndex({DIM}, path={str(tmp_path / 'c.sqlite')!r})",
        ],
        capture_output=True,
        text=True,
    )
    assert child.returncode != 0 and "BackendError" in child.stderr
    first.close()


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from cachelm.semantic import HNSWConfig, HNSWIndex, IndexEntry
    path, dim = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    def e(i, tenant):
        return IndexEntry(entry_id=f"e{i}", tenant=tenant, context_key="c", response_key=f"r{i}", vector=v[i])
    ix = HNSWIndex(dim, config=HNSWConfig(min_graph_size=16, expansion_search=256), path=path)
    ix.add([e(i, "a" if i % 3 else "b") for i in range(200)])
    ix.flush()                                   # snapshot: 200 entries
    ix.add([e(i, "a" if i % 3 else "b") for i in range(200, 300)])   # after the snapshot
    ix.remove([f"e{i}" for i in range(0, 200, 7) if i % 3 == 0])      # tenant b's, after the snapshot
    print("READY", flush=True)
    time.sleep(60)                                # killed here: no close(), no second snapshot
    """
)


def test_sigkill_after_unsnapshotted_writes_recovers_exactly(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(DIM)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    manifest = json.loads((tmp_path / "cache.sqlite.semantic.hnsw" / "manifest.json").read_text())
    assert manifest["snapshot"] == 1  # only the pre-kill snapshot exists
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    removed = {i for i in range(0, 200, 7) if i % 3 == 0}
    expected = [
        IndexEntry(
            entry_id=f"e{i}", tenant="a" if i % 3 else "b", context_key="c", response_key=f"r{i}", vector=v[i]
        )
        for i in range(300)
        if i not in removed
    ]
    assert len(manifest["partitions"]) == 1  # removing b's entries dropped b's snapshot (it held them)
    ix = HNSWIndex(DIM, config=CONFIG, path=path)
    assert ix.recovery["reconciled"] == 1  # a's graph: loaded from the snapshot, then caught up
    assert ix.recovery["rebuilt"] == 1  # b's graph: from the table
    assert_same_answers(ix, expected, np.concatenate([v[:50], vectors(30, seed=5)]))
    # Labels are never reused after recovery: a new entry does not collide with a snapshot label.
    ix.add(entries(vectors(1, seed=6), start=1000, tenant="a"))
    assert ix.search(vectors(1, seed=6)[0], tenant="a", context_key="c")[0].entry_id == "e1000"
    ix.close()


def test_unreadable_entry_table_raises_backend_error(tmp_path: Path) -> None:
    (tmp_path / "c.sqlite.semantic.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(BackendError):
        HNSWIndex(DIM, config=CONFIG, path=tmp_path / "c.sqlite")


@pytest.mark.parametrize("backend", ["hnswlib", "usearch", "faiss"])
def test_a_snapshot_older_than_a_removal_is_reconciled(tmp_path: Path, backend: str) -> None:
    """A crash between a removal's commit and the snapshot drop leaves a graph holding removed labels:
    reopening removes them (reconcile), so they are never answered."""
    import shutil

    config = HNSWConfig(backend=backend, min_graph_size=16, expansion_search=256)
    data = entries(vectors(60))
    ix = HNSWIndex(DIM, config=config, path=tmp_path / "cache.sqlite")
    ix.add(data)
    ix.flush()
    snap = tmp_path / "cache.sqlite.semantic.hnsw"
    shutil.copytree(snap, tmp_path / "old")
    ix.remove([f"e{i}" for i in range(0, 60, 4)])
    ix.close()
    shutil.rmtree(snap)
    shutil.copytree(tmp_path / "old", snap)  # as if the removal had not reached the snapshot
    again = HNSWIndex(DIM, config=config, path=tmp_path / "cache.sqlite")
    assert again.recovery == {"loaded": 0, "rebuilt": 0, "reconciled": 1, "corrupt": 0}
    kept = [e for i, e in enumerate(data) if i % 4]
    assert_same_answers(again, kept, vectors(20, seed=9))
    again.close()
