"""In-process HNSW index, optionally persisted beside the embedded store and crash-consistent.

Partitions
----------
Each (tenant, context_key) partition starts as an exact `FlatPartition`; when it reaches
`HNSWConfig.min_graph_size` vectors it is rebuilt as an HNSW graph (`GraphPartition`). Below a thousand or so
vectors a mat-vec is faster than a graph walk and exact, and most partitions (one per conversation context)
stay small. The graph library is pluggable (usearch, hnswlib, faiss) so benchmarks/semantic_perf.py can
compare them on identical data. The default is hnswlib: on 100K MiniLM vectors (M=16, ef 128/64, the shared
2-core VM, nearly idle) it answered in 165 µs P50 vs 382 µs for usearch and 128 µs for faiss, built 2× faster
than both (8.0K vs 4.0K and 3.9K vectors/s), used the same memory (1,684 B/entry serialised) and reached
recall@1 0.992 (usearch 0.994, faiss 0.992). faiss's HNSW cannot delete (removed labels become tombstones
that every search must skip), which decides the near-tie with it. Three runs, two of them under heavy load,
ranked hnswlib first or tied on query time every time; docs/BENCHMARKS.md has the latest.

Durability (``HNSWIndex(path=...)``)
------------------------------------
- ``<path>.semantic.sqlite`` (SQLite, WAL) holds every entry, vector included: it is the source of truth.
  An entry is committed there *before* it is inserted in memory, and removed there before it leaves memory.
  Each entry has an integer label (never reused: a high-water mark is kept in the ``meta`` table), the
  same integer the graph uses.
- ``<path>.semantic.hnsw/`` holds graph snapshots written by `flush` / `close` (and every
  `HNSWConfig.snapshot_every` mutations): one graph file and one label file per large partition, then a
  ``manifest.json`` (file names, SHA-256 of each file, graph settings), replaced atomically last. Files are
  named by snapshot number, so a crash mid-snapshot leaves the previous manifest and its files intact.
- Opening reads all entries, then for each large partition loads its snapshot graph if the manifest names
  one whose checksum and settings match, and *reconciles* it with the table: labels in the graph but not in
  the table are removed (deleted after the snapshot), labels in the table but not in the graph are added
  (inserted after the snapshot). A missing, corrupt or foreign snapshot costs a rebuild from the table,
  never a wrong answer. After a SIGKILL the index therefore holds exactly the committed entries.
- One process owns the files at a time (an exclusive ``fcntl`` lock on the SQLite file's ``.lock``).

At rest (``HNSWIndex(path=..., keyring=...)``)
---------------------------------------------
- A question's vector is user data: embeddings can be inverted back to much of their text. With a
  `Keyring` (the one the stores use) every entry's vector is sealed with AES-256-GCM for its tenant, bound
  to its entry id, and every graph snapshot is sealed for its partition's tenant, bound to its file name.
  Ids, tenants and response keys stay in clear (they are digests or names, and purges need them).
- An index written in plaintext is sealed in place when first opened with a keyring; a sealed index opened
  without one, or with a keyring none of its entries opens under, is refused (``ConfigError``), never wiped.
  A single entry that fails to open (tampered, truncated) is deleted and counted in ``recovery["corrupt"]``.
- Removal is erasure: the removed vectors leave memory (hnswlib's element is overwritten before it is
  deleted; usearch and faiss, which keep removed vectors, rebuild the partition), their rows are zeroed
  (``secure_delete``) and the WAL is checkpointed and truncated, and the snapshots of the touched partitions
  are dropped (the next `flush` writes them again without those vectors).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cachelm.crypto import Keyring
from cachelm.engine.loader import file_sha256
from cachelm.errors import BackendError, ConfigError, IntegrityError
from cachelm.semantic.index import FlatPartition, IndexEntry, Partition, PartitionedIndex, PartitionKey

BACKENDS = ("usearch", "hnswlib", "faiss")
_SEQUENTIAL_SEED = 1024  # usearch: nodes inserted one thread at a time before parallel insertion


@dataclass(frozen=True, kw_only=True)
class HNSWConfig:
    """Graph settings. `connectivity` is HNSW's M; `expansion_*` are ef_construction / ef_search."""

    backend: str = "hnswlib"
    connectivity: int = 16
    expansion_add: int = 128
    # ef_search 512: the fine-tuned MiniLM packs questions closely (cosines 0.4–1.0). With the six-layer
    # fine-tune, at 100K entries (M 16, ef_construction 128) ef 256 found the exact nearest for 98.6 % of
    # 500 held-out queries, 512 for 99.6 %, 1024 for 99.8 %; 512 costs ~0.4 ms more per search than 256,
    # within a ~9 ms lookup (`benchmarks/semantic_perf.py --ef-sweep`, docs/SEMANTIC.md).
    expansion_search: int = 512
    min_graph_size: int = 1024  # a partition below this is searched exactly
    snapshot_every: int = 50_000  # mutations between automatic snapshots (persisted index only)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("connectivity", "expansion_add", "expansion_search", "min_graph_size", "snapshot_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be an int >= 1, got {value!r}")


class GraphPartition:
    """One partition as an HNSW graph of the configured library. Labels are the index's integer labels."""

    def __init__(self, dim: int, config: HNSWConfig, capacity: int = 1024) -> None:
        self.dim = dim
        self.config = config
        self.backend = config.backend
        self._dead: set[int] = set()  # faiss's HNSW cannot delete: removed labels are skipped in results
        self._labels: set[int] = set()
        self.graph: Any = self._make(capacity)

    def _make(self, capacity: int) -> Any:
        c = self.config
        if self.backend == "usearch":
            from usearch.index import Index

            return Index(
                ndim=self.dim,
                metric="ip",
                dtype="f32",
                connectivity=c.connectivity,
                expansion_add=c.expansion_add,
                expansion_search=c.expansion_search,
            )
        if self.backend == "hnswlib":
            import hnswlib

            graph = hnswlib.Index(space="ip", dim=self.dim)
            graph.init_index(
                max_elements=capacity,
                M=c.connectivity,
                ef_construction=c.expansion_add,
                allow_replace_deleted=True,
            )
            graph.set_ef(c.expansion_search)
            return graph
        import faiss

        inner = faiss.IndexHNSWFlat(self.dim, c.connectivity, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = c.expansion_add
        inner.hnsw.efSearch = c.expansion_search
        return faiss.IndexIDMap2(inner)

    def set_expansion_search(self, ef: int) -> None:
        """Search with beam width `ef` (HNSW's ef_search) from now on."""
        if self.backend == "usearch":
            self.graph.expansion_search = ef
        elif self.backend == "hnswlib":
            self.graph.set_ef(ef)
        else:  # faiss: IndexIDMap2 around IndexHNSWFlat (a loaded one hands out the base class)
            import faiss

            inner: Any = faiss.downcast_index(self.graph.index)
            inner.hnsw.efSearch = ef

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> set[int]:
        return self._labels

    def add_many(self, labels: Sequence[int], vectors: np.ndarray) -> None:
        """Insert `labels` with `vectors` (n, dim); labels must be new to this partition."""
        if len(labels) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(labels), self.dim)
        if self.backend == "usearch":
            keys = np.asarray(labels, dtype=np.uint64)
            # Parallel insertion into a near-empty usearch graph can leave a node unreachable (3 of 60
            # rebuilt 40-node graphs lost a vector's match with itself): its first nodes go in one by one.
            seed = max(0, min(len(labels), _SEQUENTIAL_SEED - len(self.graph)))
            if seed:
                self.graph.add(keys[:seed], vectors[:seed], threads=1)
            if seed < len(labels):
                self.graph.add(keys[seed:], vectors[seed:])
        elif self.backend == "hnswlib":
            needed = self.graph.element_count + len(labels)
            if needed > self.graph.get_max_elements():
                self.graph.resize_index(max(needed, 2 * self.graph.get_max_elements()))
            self.graph.add_items(vectors, np.asarray(labels, dtype=np.int64), replace_deleted=True)
        else:
            self.graph.add_with_ids(vectors, np.asarray(labels, dtype=np.int64))
        self._labels.update(int(x) for x in labels)

    def add(self, label: int, vector: np.ndarray) -> None:
        if label in self._labels:
            self.remove(label)
        self.add_many([label], vector.reshape(1, -1))

    def remove(self, label: int) -> bool:
        if label not in self._labels:
            return False
        self._labels.discard(label)
        if self.backend == "usearch":
            self.graph.remove(label)
        elif self.backend == "hnswlib":
            self.graph.mark_deleted(label)
        else:
            self._dead.add(label)
        return True

    def remove_many(self, labels: Sequence[int]) -> None:
        """Remove `labels` and scrub their vectors from the graph's memory, so no later snapshot holds
        them (erasure). hnswlib and usearch keep a removed element's vector, and faiss cannot remove."""
        gone = [label for label in labels if label in self._labels]
        if not gone:
            return
        if len(gone) == len(self._labels):  # the whole partition goes: the caller drops it
            self._labels.clear()
            self.graph = self._make(1)
            self._dead.clear()
            return
        # Overwriting one hnswlib element costs some 12-43 insertions of a bulk build
        # (benchmarks/erasure_cost.py): past ~1/24 of the partition, rebuilding is cheaper.
        if self.backend == "hnswlib" and 24 * len(gone) < len(self._labels):
            zero = np.zeros((1, self.dim), dtype=np.float32)
            for label in gone:
                self._labels.discard(label)
                # Overwrite the element's stored vector, then delete it: its slot keeps no data.
                self.graph.add_items(zero, np.asarray([label], dtype=np.int64))
                self.graph.mark_deleted(label)
            return
        keep = sorted(self._labels - set(gone))  # rebuild from the vectors that stay
        vectors = self.vectors_of(keep)
        self.graph = self._make(2 * len(keep))
        self._labels, self._dead = set(), set()
        self.add_many(keep, vectors)

    def vectors_of(self, labels: Sequence[int]) -> np.ndarray:
        """The stored vectors of `labels` (live ones), as a (len(labels), dim) float32 matrix."""
        if not labels:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "usearch":
            found = self.graph.get(np.asarray(labels, dtype=np.uint64))
        elif self.backend == "hnswlib":
            found = self.graph.get_items(list(labels))
        else:
            found = [self.graph.reconstruct(int(label)) for label in labels]
        return np.asarray(found, dtype=np.float32).reshape(len(labels), self.dim)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = len(self._labels)
        if n == 0:
            return []
        k = min(k, n)
        if self.backend == "usearch":
            matches = self.graph.search(query, k)
            return [
                (int(key), 1.0 - float(d)) for key, d in zip(matches.keys, matches.distances, strict=True)
            ]
        if self.backend == "hnswlib":
            try:
                labels, dists = self.graph.knn_query(query.reshape(1, -1), k=k)
            except RuntimeError:
                # hnswlib raises when deleted elements crowd out the k asked for (k near the live count,
                # e.g. `mark_bad`'s exhaustive neighbour search): then every live vector is scored.
                return self._exact_search(query, k)
            return [(int(key), 1.0 - float(d)) for key, d in zip(labels[0], dists[0], strict=True)]
        wanted = min(k + len(self._dead), self.graph.ntotal)
        sims, labels = self.graph.search(query.reshape(1, -1), wanted)
        hits = [(int(key), float(s)) for key, s in zip(labels[0], sims[0], strict=True) if key >= 0]
        return [(key, s) for key, s in hits if key not in self._dead][:k]

    def _exact_search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The top `k` live labels by exact inner product (stable on ties, like `FlatPartition`)."""
        live = sorted(self._labels)
        scores = self.vectors_of(live) @ query  # (n,)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(live[i], float(scores[i])) for i in top]

    def save(self, path: Path) -> None:
        if self.backend == "usearch":
            self.graph.save(str(path))
        elif self.backend == "hnswlib":
            self.graph.save_index(str(path))
        else:
            import faiss

            faiss.write_index(self.graph, str(path))

    def to_bytes(self) -> bytes:
        """The graph serialised in memory (an encrypted snapshot seals these bytes)."""
        if self.backend == "usearch":
            return bytes(self.graph.save())
        if self.backend == "hnswlib":
            return pickle.dumps(self.graph, protocol=pickle.HIGHEST_PROTOCOL)
        import faiss

        return bytes(faiss.serialize_index(self.graph).tobytes())

    @classmethod
    def load(
        cls, source: Path | bytes, labels: Iterable[int], dim: int, config: HNSWConfig
    ) -> GraphPartition:
        """Load a graph saved to a file (`save`) or to bytes (`to_bytes`; only bytes this index wrote and
        authenticated: hnswlib's bytes are a pickle), whose live labels (as saved) are `labels`."""
        part = cls(dim, config, capacity=1)
        if config.backend == "usearch":
            part.graph.load(source if isinstance(source, bytes) else str(source))
        elif config.backend == "hnswlib":
            if isinstance(source, bytes):
                part.graph = pickle.loads(source)  # sealed by this index, opened by AES-GCM
            else:
                part.graph.load_index(str(source), allow_replace_deleted=True)
            part.set_expansion_search(config.expansion_search)
        else:
            import faiss

            part.graph = (
                faiss.deserialize_index(np.frombuffer(source, dtype=np.uint8))
                if isinstance(source, bytes)
                else faiss.read_index(str(source))
            )
            part.set_expansion_search(config.expansion_search)
            stored = set(faiss.vector_to_array(part.graph.id_map).tolist())
            part._dead = stored - set(labels)
        part._labels = {int(x) for x in labels}
        return part


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    label INTEGER PRIMARY KEY,
    entry_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    context_key TEXT NOT NULL,
    response_key TEXT NOT NULL,
    created REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _partition_file_id(key: PartitionKey) -> str:
    return hashlib.sha256(f"{key[0]}\x00{key[1]}".encode()).hexdigest()[:24]


class HNSWIndex(PartitionedIndex):
    """Partitioned HNSW (see module docstring). In memory, or durable when `path` is given.

    `path` is the embedded store's file (e.g. ``cache.sqlite``); the index writes ``cache.sqlite.semantic.*``
    beside it. Settings (dim, graph parameters) are persisted and must match on reopen.
    """

    def __init__(
        self,
        dim: int,
        *,
        config: HNSWConfig | None = None,
        path: str | os.PathLike[str] | None = None,
        keyring: Keyring | None = None,
    ):
        super().__init__(dim)
        self.config = config or HNSWConfig()
        if not isinstance(self.config, HNSWConfig):
            raise ConfigError(f"`config` must be an HNSWConfig, got {type(self.config).__name__}")
        if keyring is not None and not isinstance(keyring, Keyring):
            raise ConfigError(f"`keyring` must be a Keyring, got {type(keyring).__name__}")
        if keyring is not None and path is None:
            raise ConfigError(
                "`keyring` needs `path`: an index kept in memory has nothing at rest to encrypt"
            )
        self.keyring = keyring
        self._db: sqlite3.Connection | None = None
        self._closed = False  # a persisted index after `close`: changes would live in memory only
        self._mutations = 0
        # corrupt: entries whose stored vector could not be read (tampered, truncated): deleted on open
        self.recovery: dict[str, int] = {"loaded": 0, "rebuilt": 0, "reconciled": 0, "corrupt": 0}
        if path is not None:
            self._open(Path(path))

    # -- partitions -------------------------------------------------------------------------------
    def _maybe_upgrade(self, part: FlatPartition | Partition) -> FlatPartition | Partition:
        if isinstance(part, FlatPartition) and len(part) >= self.config.min_graph_size:
            graph = GraphPartition(self._dim, self.config, capacity=2 * len(part))
            graph.add_many(part.labels, part.vectors[: len(part)])
            return graph
        return part

    def graph_partitions(self) -> int:
        with self._lock:
            return sum(isinstance(p, GraphPartition) for p in self._partitions.values())

    # -- durability -------------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        self._base = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{path}.semantic.lock", "a+b")  # noqa: SIM115 - held for the index's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            raise BackendError(f"semantic index {path} is open in another process") from exc
        try:
            self._db = sqlite3.connect(
                f"{path}.semantic.sqlite", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a process crash loses nothing committed; only a power cut can lose the
            # last transactions, which then simply are not in the cache.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA secure_delete=ON")  # a removed vector's bytes are zeroed in the file
            self._db.executescript(_SCHEMA)
            self._check_settings()
            self._load_entries()
        except BaseException as exc:  # release the files, so a retry (the right keyring, say) can open them
            if self._db is not None:
                self._db.close()
                self._db = None
            self._lock_file.close()
            if isinstance(exc, sqlite3.Error):
                raise BackendError(f"semantic index {path}: {exc}") from exc
            raise

    @property
    def _snap_dir(self) -> Path:
        return Path(f"{self._base}.semantic.hnsw")

    def _check_settings(self) -> None:
        assert self._db is not None
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if "dim" in rows and int(rows["dim"]) != self._dim:
            raise ConfigError(
                f"`dim` is {self._dim} but the index at {self._base} was created with {rows['dim']}"
            )
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(self._dim),))
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_label', '1')")
        sealed = rows.get("sealed") == "1"  # an index written before encryption existed has no such row
        if sealed and self.keyring is None:
            raise ConfigError(
                f"the semantic index at {self._base} is encrypted: open it with the keyring that sealed it"
            )
        if self.keyring is not None and not sealed:
            self._seal_existing()
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('sealed', ?)", ("1" if self.keyring else "0",))

    def _seal_existing(self) -> None:
        """Encryption was turned on for an index written in plaintext: seal every entry's vector in one
        transaction, drop the plaintext graph snapshots, and leave no plaintext page behind."""
        assert self._db is not None and self.keyring is not None
        rows = self._db.execute("SELECT label, entry_id, tenant, vector FROM entries").fetchall()
        sealed = [
            (self._seal_vector(blob, tenant, entry_id), label) for label, entry_id, tenant, blob in rows
        ]
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("UPDATE entries SET vector=? WHERE label=?", sealed)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('sealed', '1')")
        self._db.execute("COMMIT")
        with contextlib.suppress(FileNotFoundError):
            for file in self._snap_dir.iterdir():
                file.unlink()
        self._scrub()

    def _seal_vector(self, raw: bytes, tenant: str, entry_id: str) -> bytes:
        if self.keyring is None:
            return raw
        return self.keyring.encrypt(raw, tenant_id=tenant, record_key=f"semantic:{entry_id}")

    def _open_vector(self, blob: bytes, tenant: str, entry_id: str) -> np.ndarray | None:
        """The stored vector, or None when it cannot be read (not sealed as it should be, tampered,
        truncated)."""
        if not isinstance(blob, bytes):  # a corrupt row: SQLite keeps whatever type was written
            return None
        try:
            raw = (
                blob
                if self.keyring is None
                else self.keyring.decrypt(blob, tenant_id=tenant, record_key=f"semantic:{entry_id}")
            )
        except IntegrityError:
            return None
        if len(raw) != 4 * self._dim:
            return None
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        return vector if np.isfinite(vector).all() else None

    def _load_entries(self) -> None:
        assert self._db is not None
        by_part: dict[PartitionKey, list[tuple[int, IndexEntry]]] = {}
        unreadable: list[int] = []
        rows = self._db.execute(
            "SELECT label, entry_id, tenant, context_key, response_key, created, vector FROM entries"
        ).fetchall()
        for label, entry_id, tenant, ctx, rkey, created, blob in rows:
            vector = self._open_vector(blob, tenant, entry_id)
            try:
                if vector is None:
                    raise ConfigError("unreadable vector")
                entry = IndexEntry(
                    entry_id=entry_id,
                    tenant=tenant,
                    context_key=ctx,
                    response_key=rkey,
                    vector=vector,
                    created=created,
                )
            except ConfigError:  # one corrupt row is one lost entry, not an index that cannot open
                unreadable.append(label)
                continue
            by_part.setdefault(entry.partition, []).append((label, entry))
        if unreadable and len(unreadable) == len(rows) and self.keyring is not None:
            # Every entry failing means the wrong keys, not tampering: refuse rather than delete them all.
            raise ConfigError(
                f"none of the {len(rows)} entries of the semantic index at {self._base} opens with this "
                f"keyring (key ids {list(self.keyring.key_ids)}): is it the keyring that sealed them?"
            )
        if unreadable:  # a cache entry that cannot be read is dropped, as a corrupt record is
            self.recovery["corrupt"] += len(unreadable)
            self._db.executemany("DELETE FROM entries WHERE label=?", [(x,) for x in unreadable])
        (next_label,) = self._db.execute("SELECT value FROM meta WHERE key='next_label'").fetchone()
        manifest = self._read_manifest()
        stale_snapshots: list[PartitionKey] = []
        for key, items in by_part.items():
            graph = (
                self._load_graph(key, items, manifest, stale_snapshots)
                if len(items) >= self.config.min_graph_size
                else None
            )
            if graph is not None:
                self._partitions[key] = graph
            for label, entry in items:
                if graph is None:
                    self._insert(label, entry)
                else:  # the graph already holds the vector: only the maps are filled
                    self._index_meta(label, entry)
        self._next_label = max(self._next_label, int(next_label))
        # A snapshot older than a removal (a crash in between) still holds the removed vectors on disk.
        if stale_snapshots:
            self._removed_from(stale_snapshots)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self._snap_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}
        if (
            not isinstance(manifest, dict)
            or manifest.get("config") != asdict(self.config)
            or manifest.get("dim") != self._dim
        ):
            return {}  # another backend or other graph settings: rebuild rather than guess
        return manifest

    def _load_graph(
        self,
        key: PartitionKey,
        items: list[tuple[int, IndexEntry]],
        manifest: dict[str, Any],
        stale_snapshots: list[PartitionKey],
    ) -> GraphPartition:
        live = {label: entry.vector for label, entry in items}
        info = manifest.get("partitions", {}).get(_partition_file_id(key))
        graph = None
        # A snapshot sealed otherwise than this index seals (plaintext under a keyring) is not trusted.
        if isinstance(info, dict) and bool(info.get("sealed")) == (self.keyring is not None):
            with contextlib.suppress(Exception):  # any unreadable snapshot means: rebuild
                gpath, lpath = self._snap_dir / info["graph"], self._snap_dir / info["labels"]
                if file_sha256(gpath) == info["graph_sha256"] and file_sha256(lpath) == info["labels_sha256"]:
                    saved = np.load(lpath).tolist()
                    source: Path | bytes = gpath
                    if self.keyring is not None:
                        source = self.keyring.decrypt(
                            gpath.read_bytes(), tenant_id=key[0], record_key=f"semantic-graph:{info['graph']}"
                        )
                    graph = GraphPartition.load(source, saved, self._dim, self.config)
        if graph is None:
            graph = GraphPartition(self._dim, self.config, capacity=2 * len(items))
            graph.add_many(list(live), np.stack(list(live.values())))
            self.recovery["rebuilt"] += 1
            return graph
        stale = [label for label in graph.labels if label not in live]
        fresh = [label for label in live if label not in graph.labels]
        if stale:
            # Removed after the snapshot: scrubbed, not merely marked deleted, so that no later snapshot
            # writes their vectors again (erasure); the stale snapshot itself is dropped by the caller.
            graph.remove_many(stale)
            stale_snapshots.append(key)
        if fresh:
            graph.add_many(fresh, np.stack([live[label] for label in fresh]))
        self.recovery["reconciled" if stale or fresh else "loaded"] += 1
        return graph

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"semantic index {self._base} is closed: the change would not be kept")

    def _journal_add(self, labelled: Sequence[tuple[int, IndexEntry]]) -> None:
        self._check_open()
        if self._db is None:
            return
        rows = [
            (
                label,
                e.entry_id,
                e.tenant,
                e.context_key,
                e.response_key,
                e.created,
                self._seal_vector(
                    np.ascontiguousarray(e.vector, dtype="<f4").tobytes(), e.tenant, e.entry_id
                ),
            )
            for label, e in labelled
        ]
        high = max(label for label, _ in labelled) + 1
        self._write(
            lambda db: (
                db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?)", rows),
                db.execute(
                    "UPDATE meta SET value=? WHERE key='next_label' AND CAST(value AS INT) < ?",
                    (str(high), high),
                ),
            ),
            len(rows),
        )

    def _journal_remove(self, labels: Sequence[int]) -> None:
        self._check_open()
        if self._db is None:
            return
        self._write(
            lambda db: db.executemany("DELETE FROM entries WHERE label=?", [(x,) for x in labels]),
            len(labels),
        )
        self._scrub()

    def _scrub(self) -> None:
        """Write the WAL into the file and truncate it: with ``secure_delete`` the removed rows' bytes are
        then gone from both (the WAL would keep old page images until it is reused)."""
        assert self._db is not None
        try:
            (busy, _, _) = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            raise BackendError(f"semantic index {self._base}: {exc}") from exc
        if busy:  # this process owns the file (flock) and reads through one connection: cannot happen
            raise BackendError(f"semantic index {self._base}: the WAL checkpoint was blocked")

    def _removed_from(self, partitions: Sequence[PartitionKey]) -> None:
        """Drop the graph snapshots of `partitions` (they hold the removed vectors): a reopen rebuilds
        those partitions from the table, and the next `flush` writes them again, scrubbed."""
        if self._db is None:
            return
        manifest = self._read_manifest()
        saved = manifest.get("partitions", {})
        doomed = [fid for fid in map(_partition_file_id, partitions) if fid in saved]
        if not doomed:
            return
        files = [saved.pop(fid) for fid in doomed]
        self._write_manifest(manifest)
        for info in files:
            for name in (info["graph"], info["labels"]):
                (self._snap_dir / name).unlink(missing_ok=True)

    def _write(self, body: Any, count: int) -> None:
        assert self._db is not None
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                body(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise BackendError(f"semantic index {self._base}: {exc}") from exc
        self._mutations += count
        if self._mutations >= self.config.snapshot_every:
            self.flush()

    def flush(self) -> None:
        """Write a snapshot of every graph partition (no-op for an in-memory index)."""
        if self._db is None:
            return
        with self._lock:
            self._mutations = 0
            snap = self._snap_dir
            snap.mkdir(exist_ok=True)
            old = self._read_manifest()
            number = int(old.get("snapshot", 0)) + 1
            parts: dict[str, dict[str, Any]] = {}
            for key, part in self._partitions.items():
                if not isinstance(part, GraphPartition):
                    continue
                fid = _partition_file_id(key)
                gname, lname = f"{fid}-{number}.graph", f"{fid}-{number}.labels.npy"
                if self.keyring is None:
                    part.save(snap / gname)
                else:  # sealed for the partition's tenant, bound to the file's name
                    envelope = self.keyring.encrypt(
                        part.to_bytes(), tenant_id=key[0], record_key=f"semantic-graph:{gname}"
                    )
                    (snap / gname).write_bytes(envelope)
                np.save(snap / lname, np.asarray(sorted(part.labels), dtype=np.int64))
                parts[fid] = {
                    "graph": gname,
                    "labels": lname,
                    "graph_sha256": file_sha256(snap / gname),
                    "labels_sha256": file_sha256(snap / lname),
                    "sealed": self.keyring is not None,
                }
            self._write_manifest(
                {"snapshot": number, "dim": self._dim, "config": asdict(self.config), "partitions": parts}
            )
            keep = {"manifest.json"} | {name for p in parts.values() for name in (p["graph"], p["labels"])}
            for file in snap.iterdir():
                if file.name not in keep:
                    file.unlink(missing_ok=True)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        snap = self._snap_dir
        tmp = snap / "manifest.json.tmp"
        with tmp.open("w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, snap / "manifest.json")  # the commit point of a snapshot

    def close(self) -> None:
        if self._db is None:
            return
        self.flush()
        with self._lock:  # an `add` running meanwhile finishes first; later ones are refused
            self._closed = True
            self._db.close()
            self._db = None
        self._lock_file.close()  # releases the flock
