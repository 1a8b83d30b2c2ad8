"""What erasing from disk costs: the embedded store's purge and the persisted semantic index's removal.

Since 2026-12-07 an erasure leaves the disk (see `cachelm.store.sqlite` and `cachelm.semantic.hnsw`):

- `SQLiteStore.purge` ends with a TRUNCATE checkpoint of the WAL. Measured against the same DELETE without
  it (`_delete_where` without `scrub=True`: the same code path minus the checkpoint), one user's
  records out of a store that keeps receiving writes between purges, so each checkpoint has a WAL to copy.
- `HNSWIndex` removal overwrites the removed element of the hnswlib graph before deleting it. Measured
  against the mark-only delete it replaced (`GraphPartition.remove`), one label at a time, on the same graph.
- A removal drops the snapshot of the partition it touched, so a process that dies before its next `flush`
  rebuilds that partition at the next open. Measured: opening with the snapshot against opening without it.
- The index sealed with a keyring against the same index in plaintext: adding, closing, reopening.
- Purges while other threads read and write the store: whether the checkpoint still finishes.

    python benchmarks/erasure_cost.py                 # ~1 minute on a 2-core VM
    python benchmarks/erasure_cost.py --render docs/results/erasure_cost.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cachelm.errors import BackendError
from cachelm.semantic import HNSWConfig, HNSWIndex, IndexEntry
from cachelm.semantic.hnsw import GraphPartition
from cachelm.store import Match, Record, SQLiteStore
from cachelm.store.sqlite import _where_sql


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def store_purge(tmp: Path, records: int, users: int, writes_between: int, reps: int) -> dict[str, Any]:
    """Median ms of one user's purge, with the checkpoint (as shipped) and without it, interleaved."""
    store = SQLiteStore(tmp / "store.db")
    value = b"x" * 1024
    for i in range(records):
        store.put(Record(key=f"{i:064x}", value=value, tenant="acme", user=f"u{i % users}"))
    shipped, bare = [], []
    counter = records
    for rep in range(reps):
        for variant in ("shipped", "bare"):
            for _ in range(writes_between):  # the server keeps writing: the WAL grows between purges
                counter += 1
                store.put(Record(key=f"{counter:064x}", value=value, tenant="acme", user="other"))
            where = Match(tenant="acme", user=f"u{(2 * rep + (variant == 'bare')) % users}")
            start = time.perf_counter()
            if variant == "shipped":
                store.purge(where)
                shipped.append(time.perf_counter() - start)
            else:
                sql, params = _where_sql(where, live_at=store.clock())
                store._delete_where("bench", sql, params)  # the same DELETE, without `scrub`
                bare.append(time.perf_counter() - start)
    store.close()
    return {
        "records": records,
        "per_user": records // users,
        "writes_between": writes_between,
        "purge_ms": _ms(statistics.median(shipped)),
        "delete_only_ms": _ms(statistics.median(bare)),
    }


def store_purge_under_load(tmp: Path, records: int, users: int, readers: int) -> dict[str, Any]:
    """Purges while `readers` threads read and one thread writes: how many succeed (the checkpoint must
    find a moment no reader holds an older snapshot), and how long they take (ms, median and max)."""
    import threading

    store = SQLiteStore(tmp / "loaded.db")
    value = b"x" * 1024
    for i in range(records):
        store.put(Record(key=f"{i:064x}", value=value, tenant="acme", user=f"u{i % users}"))
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for i in range(0, records, 7):
                store.get(f"{i:064x}")

    def write() -> None:
        n = 10**9
        while not stop.is_set():
            n += 1
            store.put(Record(key=f"{n:064x}", value=value, tenant="acme", user="other"))

    threads = [threading.Thread(target=read) for _ in range(readers)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    times, failed = [], 0
    try:
        for u in range(users):
            start = time.perf_counter()
            try:
                store.purge(Match(tenant="acme", user=f"u{u}"))
            except BackendError:  # counted: a purge a reader blocked says so
                failed += 1
            times.append(time.perf_counter() - start)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.close()
    return {
        "records": records,
        "purges": users,
        "readers": readers,
        "failed": failed,
        "median_ms": _ms(statistics.median(times)),
        "max_ms": _ms(max(times)),
    }


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def graph_removal(n: int, dim: int, removals: int) -> dict[str, Any]:
    """Per-label ms of hnswlib removal: mark only (before) against overwrite-then-mark (now), same graph."""
    config = HNSWConfig()
    part = GraphPartition(dim, config, capacity=n)
    start = time.perf_counter()
    part.add_many(list(range(n)), _vectors(n, dim, 0))
    build = (time.perf_counter() - start) / n
    labels = list(range(2 * removals))
    start = time.perf_counter()
    for label in labels[::2]:
        part.remove(label)
    marked = (time.perf_counter() - start) / removals
    start = time.perf_counter()
    for label in labels[1::2]:
        part.remove_many([label])
    scrubbed = (time.perf_counter() - start) / removals
    return {
        "entries": n,
        "dim": dim,
        "mark_only_us": round(1e6 * marked, 1),
        "scrub_us": round(1e6 * scrubbed, 1),
        "bulk_insert_us": round(1e6 * build, 1),
    }


def index_removal_and_reopen(tmp: Path, n: int, dim: int, removals: int) -> dict[str, Any]:
    """Ms of one persisted-index removal (row, checkpoint, snapshot drop), and open times with and
    without the partition's snapshot."""
    path = tmp / "index" / "cache.db"
    vectors = _vectors(n, dim, 1)
    index = HNSWIndex(dim, path=path)
    entries = [
        IndexEntry(entry_id=f"e{i}", tenant="acme", context_key="c", response_key=f"r{i}", vector=v)
        for i, v in enumerate(vectors)
    ]
    for start in range(0, n, 1000):
        index.add(entries[start : start + 1000])
    index.flush()
    times = []
    for i in range(removals):
        start = time.perf_counter()
        index.remove([f"e{i}"])
        times.append(time.perf_counter() - start)
    index.close()  # flushes: the snapshot is written again
    start = time.perf_counter()
    HNSWIndex(dim, path=path).close()
    with_snapshot = time.perf_counter() - start
    shutil.rmtree(Path(f"{path}.semantic.hnsw"))  # as after a removal and a crash before the next flush
    start = time.perf_counter()
    reopened = HNSWIndex(dim, path=path)
    without = time.perf_counter() - start
    assert reopened.recovery["rebuilt"] == 1
    reopened._db.close()  # type: ignore[union-attr]  # no flush: keep the timing run's files as they are
    return {
        "entries": n,
        "dim": dim,
        "remove_ms": _ms(statistics.median(times)),
        "open_with_snapshot_s": round(with_snapshot, 2),
        "open_rebuilding_s": round(without, 2),
    }


def sealed_against_plain(tmp: Path, n: int, dim: int) -> dict[str, Any]:
    """Seconds to add, close (the snapshot) and reopen the same entries, plain and sealed with a keyring."""
    from cachelm.crypto import Keyring

    vectors = _vectors(n, dim, 2)
    entries = [
        IndexEntry(entry_id=f"e{i}", tenant="acme", context_key="c", response_key=f"r{i}", vector=v)
        for i, v in enumerate(vectors)
    ]
    out: dict[str, Any] = {"entries": n, "dim": dim}
    for name, keyring in (("plain", None), ("sealed", Keyring.generate())):
        path = tmp / name / "cache.db"
        start = time.perf_counter()
        index = HNSWIndex(dim, path=path, keyring=keyring)
        for first in range(0, n, 1000):
            index.add(entries[first : first + 1000])
        added = time.perf_counter() - start
        start = time.perf_counter()
        index.close()
        closed = time.perf_counter() - start
        start = time.perf_counter()
        again = HNSWIndex(dim, path=path, keyring=keyring)
        opened = time.perf_counter() - start
        assert again.recovery["loaded"] == 1
        again.close()
        out[name] = {"add_s": round(added, 2), "close_s": round(closed, 2), "open_s": round(opened, 2)}
    return out


def render(results: dict[str, Any]) -> str:
    s, g, ix = results["store"], results["graph"], results["index"]
    store_what = (
        f"SQLite store: purge one user ({s['per_user']} of {s['records']:,} records of 1 KB; "
        f"{s['writes_between']} writes between purges)"
    )
    rows = [
        (store_what, f"{s['purge_ms']} ms", f"{s['delete_only_ms']} ms (DELETE only)",
         s["purge_ms"] / s["delete_only_ms"]),
        (f"hnswlib graph ({g['entries']:,} × {g['dim']}): remove one element",
         f"{g['scrub_us']:,} µs (overwrite, then mark)", f"{g['mark_only_us']:,} µs (mark only)",
         g["scrub_us"] / g["mark_only_us"]),
    ]  # fmt: skip
    table = "\n".join(f"| {what} | {now} | {before} | {ratio:.1f}× |" for what, now, before, ratio in rows)
    load = results.get("loaded")
    loaded = (
        ""
        if load is None
        else f"""
Under load ({load["readers"]} threads reading and one writing, {load["records"]:,} records): of
{load["purges"]} purges, {load["purges"] - load["failed"]} finished and {load["failed"]} were blocked by a
reader; median {load["median_ms"]} ms, slowest {load["max_ms"]} ms.
"""
    )
    return f"""## Erasure that leaves the files — what it costs

Machine: {results["machine"]}.
Command: `{results["command"]}`

The store's purge ends with a TRUNCATE checkpoint (erased records' old pages leave the WAL); an index
removal overwrites the hnswlib element before deleting it, zeroes the row (`secure_delete`), truncates the
WAL and drops the touched partition's snapshot. Medians; both sides measured in the same run, same data.

| what | as shipped | without the erasure step | ratio |
|---|---|---|---|
{table}
{loaded}
One overwrite costs {g["scrub_us"] / g["bulk_insert_us"]:.0f} insertions of a bulk build of that graph
({g["bulk_insert_us"]} µs each), so a removal of more than ~1/24 of a partition rebuilds it instead
(`GraphPartition.remove_many`).

Persisted index ({ix["entries"]:,} × {ix["dim"]}, one partition): one removal takes {ix["remove_ms"]} ms
in all (row, checkpoint, snapshot drop). Opening it takes {ix["open_with_snapshot_s"]} s with the
partition's snapshot and {ix["open_rebuilding_s"]} s without it: what a process pays at its next open when
it died between a removal and its next `flush` (`close` flushes).
""" + _render_sealed(results.get("sealed"))


def _render_sealed(sealed: dict[str, Any] | None) -> str:
    if sealed is None:
        return ""
    rows = "\n".join(
        f"| {what} | {sealed['plain'][key]} s | {sealed['sealed'][key]} s | "
        f"{sealed['sealed'][key] / sealed['plain'][key]:.2f}× |"
        for what, key in (("add every entry", "add_s"), ("close (snapshot)", "close_s"), ("reopen", "open_s"))
    )
    return f"""
Encrypted at rest (`HNSWIndex(keyring=...)`), the same {sealed["entries"]:,} × {sealed["dim"]} entries:

| step | plain | sealed | ratio |
|---|---|---|---|
{rows}
"""


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    from _report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, g = results["store"], results["graph"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, title, pair in (
        (axes[0], "SQLite store: purge one user (ms)", (s["delete_only_ms"], s["purge_ms"])),
        (axes[1], "hnswlib: remove one element (µs)", (g["mark_only_us"], g["scrub_us"])),
    ):
        ax.bar(["before", "erasing"], pair, color=["#999999", "#3b75af"])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("median")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--entries", type=int, default=20_000, help="vectors in the index's one partition")
    p.add_argument("--dim", type=int, default=384, help="MiniLM's")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="where the JSON goes")
    p.add_argument("--render", type=Path, default=None, help="only rewrite the docs section from this JSON")
    args = p.parse_args(argv)
    from _report import DOCS_IMG, machine_description, write_section

    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        if min(args.records, args.entries, args.dim, args.reps) < 1 or args.records < 200:
            p.error("--records ≥ 200; --entries, --dim and --reps ≥ 1")
        command = ["python benchmarks/erasure_cost.py", *(argv if argv is not None else sys.argv[1:])]
        results = {"machine": machine_description(), "command": " ".join(command)}
        with tempfile.TemporaryDirectory() as tmp:
            results["store"] = store_purge(Path(tmp), args.records, 200, 500, args.reps)
            print(json.dumps(results["store"]), flush=True)
            results["loaded"] = store_purge_under_load(Path(tmp), 2000, 20, 3)
            print(json.dumps(results["loaded"]), flush=True)
            results["graph"] = graph_removal(args.entries, args.dim, 200)
            print(json.dumps(results["graph"]), flush=True)
            results["index"] = index_removal_and_reopen(Path(tmp), args.entries, args.dim, args.reps)
            print(json.dumps(results["index"]), flush=True)
            results["sealed"] = sealed_against_plain(Path(tmp), args.entries, args.dim)
            print(json.dumps(results["sealed"]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "erasure_cost.json").write_text(json.dumps(results, indent=1))
    md = render(results)
    print(md)
    plot(results, DOCS_IMG / "erasure_cost.png")
    write_section("erasure-cost", md + "\n![erasure cost](img/erasure_cost.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
