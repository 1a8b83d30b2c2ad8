"""What stays on disk after a PostgreSQL + pgvector index removes a user's vectors, and what each
PostgreSQL maintenance step takes out, at what cost.

`PgVectorIndex.remove_*` is a `DELETE`. PostgreSQL never overwrites a row in place: the deleted row stays
in its heap page, its HNSW element stays in the index, and the change is written to the WAL. This script
fills an index of the real `PgVectorIndex` in a private server (`pgserver`, the one the tests use, so its
data directory can be read) and removes one user's entries (spread over the table, as a real user's are).
After the removal, and again after one of the steps below (another user for each), it counts the removed
vectors whose bytes (float32, as pgvector stores them) are still in the table's files, the HNSW index's
files, other files of the data directory, and the WAL:

1. the `DELETE` (as shipped), then a `CHECKPOINT`, so the pages are on disk;
2. or `VACUUM` with PostgreSQL's defaults, which may skip the index when few rows died (the
   "bypass index vacuuming" rule of PostgreSQL 14+);
3. or `VACUUM (INDEX_CLEANUP ON)`, which cleans the index in any case (pgvector repairs the graph and
   zeroes the deleted elements);
4. or `VACUUM FULL`, which rewrites the table and rebuilds every index into new files.

    python benchmarks/pgvector_erasure.py               # ~3 minutes on a 2-core VM
    python benchmarks/pgvector_erasure.py --render docs/results/pgvector_erasure.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cachelm.semantic import IndexEntry, PgVectorIndex

VACUUMS = (
    ("vacuum", "VACUUM (defaults)", "VACUUM {t}"),
    ("vacuum_index", "VACUUM (INDEX_CLEANUP ON)", "VACUUM (INDEX_CLEANUP ON) {t}"),
    ("vacuum_full", "VACUUM FULL", "VACUUM FULL {t}"),
)


def _relation_files(data_dir: Path, index: PgVectorIndex, relation: str) -> set[Path]:
    """The files of `relation` now: its main fork and its 1 GB segments (`16384`, `16384.1`, ...)."""
    with index._lock:
        (rel,) = index._conn.execute("SELECT pg_relation_filepath(%s)", (relation,)).fetchone()
    main = data_dir / rel
    return {p for p in main.parent.glob(main.name + "*") if p.name.split(".")[0] == main.name}


def residue(data_dir: Path, index: PgVectorIndex, vectors: np.ndarray) -> dict[str, int]:
    """How many of `vectors` still have their bytes in each kind of file of the data directory."""
    table = _relation_files(data_dir, index, index.table)
    hnsw = _relation_files(data_dir, index, f"{index.table}_hnsw")
    found = {"table": 0, "hnsw_index": 0, "other_files": 0, "wal": 0}
    blobs: dict[str, list[bytes]] = {kind: [] for kind in found}
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        kind = (
            "table" if path in table
            else "hnsw_index" if path in hnsw
            else "wal" if "pg_wal" in path.parts
            else "other_files"
        )  # fmt: skip
        try:
            blobs[kind].append(path.read_bytes())
        except OSError:  # a file the server removed while we walked
            continue
    for vector in vectors:
        needle = vector.astype(np.float32).tobytes()[:64]  # 16 floats: no false match by chance
        for kind, contents in blobs.items():
            found[kind] += any(needle in blob for blob in contents)
    return found


def run(data_dir: Path, url: str, n: int, dim: int, removed: int) -> dict[str, Any]:
    """One user per maintenance step: their entries are removed, then that step runs; residue after each."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    doomed = rng.choice(n, size=removed * len(VACUUMS), replace=False).reshape(len(VACUUMS), removed)
    owner = {int(i): f"user{k}" for k, rows in enumerate(doomed) for i in rows}  # spread, as real users' are
    index = PgVectorIndex(url, dim, table="erasure")
    start = time.perf_counter()
    for first in range(0, n, 1000):
        index.add(
            [
                IndexEntry(
                    entry_id=f"e{i}",
                    tenant="acme",
                    context_key="c",
                    response_key=f"{owner.get(i, 'other')}:{i}",
                    vector=vectors[i],
                )
                for i in range(first, min(n, first + 1000))
            ]
        )
    filled = time.perf_counter() - start
    out: dict[str, Any] = {"entries": n, "dim": dim, "removed": removed, "fill_s": round(filled, 1)}
    with index._lock:
        out["postgres"], out["pgvector"] = index._conn.execute(
            "SELECT current_setting('server_version'), extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
    steps = []
    for rows, (name, what, sql) in zip(doomed, VACUUMS, strict=True):
        start = time.perf_counter()
        count = index.remove_response_keys("acme", [f"{owner[int(i)]}:{i}" for i in rows])
        deleted = time.perf_counter() - start
        assert count == removed, count
        with index._lock:
            index._conn.execute("CHECKPOINT")
        after_delete = residue(data_dir, index, vectors[rows])
        start = time.perf_counter()
        with index._lock:
            index._conn.execute(sql.format(t=index.table))
            vacuumed = time.perf_counter() - start
            index._conn.execute("CHECKPOINT")
        step = {
            "step": name,
            "what": what,
            "delete_s": round(deleted, 4),
            "vacuum_s": round(vacuumed, 3),
            "after_delete": after_delete,
            "after_vacuum": residue(data_dir, index, vectors[rows]),
        }
        steps.append(step)
        print(json.dumps(step), flush=True)
    out["steps"] = steps
    index.drop()
    index.close()
    return out


def render(results: dict[str, Any]) -> str:
    r = results["run"]

    def cells(left: dict[str, int]) -> str:
        return " | ".join(str(left[kind]) for kind in ("table", "hnsw_index", "other_files", "wal"))

    rows = "\n".join(
        f"| DELETE (as shipped) | {s['delete_s'] * 1000:,.1f} ms | {cells(s['after_delete'])} |\n"
        f"| then {s['what']} | {s['vacuum_s'] * 1000:,.0f} ms | {cells(s['after_vacuum'])} |"
        for s in r["steps"]
    )
    return f"""## pgvector: what a removal leaves on disk

Machine: {results["machine"]}; PostgreSQL {r["postgres"]}, pgvector {r["pgvector"]}.
Command: `{results["command"]}`

`PgVectorIndex` with {r["entries"]:,} vectors of {r["dim"]} dimensions. For each maintenance step, another
user's {r["removed"]} entries (spread over the table) are removed, then the step runs. Each row counts how
many of those {r["removed"]} vectors still have their bytes in the table's files, the HNSW index's files,
the data directory's other files and the WAL, after a `CHECKPOINT`.

| step | time | table | HNSW index | other files | WAL |
|---|---|---|---|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=384, help="MiniLM's")
    p.add_argument("--removed", type=int, default=100, help="the user's entries")
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="where the JSON goes")
    p.add_argument("--render", type=Path, default=None, help="only rewrite the docs section from this JSON")
    args = p.parse_args(argv)
    from _report import machine_description, write_section

    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        if not 1 <= args.removed < args.entries or args.dim < 16:
            p.error("1 ≤ --removed < --entries; --dim ≥ 16")
        try:
            import pgserver
        except ImportError:
            p.error("needs the `pgserver` package (./dev setup installs it): the data directory is read")
        command = ["python benchmarks/pgvector_erasure.py", *(argv if argv is not None else sys.argv[1:])]
        results = {"machine": machine_description(), "command": " ".join(command)}
        with tempfile.TemporaryDirectory() as tmp:
            server = pgserver.get_server(tmp, cleanup_mode="stop")
            try:
                results["run"] = run(Path(tmp), server.get_uri(), args.entries, args.dim, args.removed)
            finally:
                server.cleanup()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pgvector_erasure.json").write_text(json.dumps(results, indent=1))
    md = render(results)
    print(md)
    write_section("pgvector-erasure", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
