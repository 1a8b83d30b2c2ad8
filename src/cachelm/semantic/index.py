"""Vector indexes for the semantic cache: the `VectorIndex` protocol and the exact flat index.

Filters live inside the search, by construction
-----------------------------------------------
Every entry belongs to one *partition*, ``(tenant, context_key)``. The context key (`cachelm.keys.
semantic_query`) already digests the model, its parameters, the system prompt and the earlier turns, so a
partition holds exactly the entries whose answers are interchangeable apart from the last user turn. A
search names its partition and only that partition's vectors are scored: another tenant's vectors (or
another conversation's) are not filtered out of a result list afterwards, they are never candidates. The
in-process indexes keep one structure per partition; the pgvector index puts ``tenant`` and
``context_key`` in the SQL ``WHERE`` clause of the same statement that ranks by distance.

Similarity is the inner product of unit vectors (cosine), in [-1, 1]; higher is closer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from cachelm.errors import ConfigError
from cachelm.semantic.embedder import Vectors

PartitionKey = tuple[str, str]  # (tenant, context_key)


@dataclass(frozen=True, kw_only=True)
class IndexEntry:
    """One semantic entry: the vector of a last user turn, and the exact-cache key of its answer."""

    entry_id: str
    tenant: str
    context_key: str
    response_key: str
    vector: np.ndarray  # (dim,) float32, unit norm
    created: float = 0.0

    def __post_init__(self) -> None:
        for name in ("entry_id", "tenant", "context_key", "response_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"`{name}` must be a non-empty string, got {value!r}")
        vector = np.asarray(self.vector, dtype=np.float32)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise ConfigError(f"`vector` must be a finite 1-D array, got shape {vector.shape}")
        object.__setattr__(self, "vector", vector)

    @property
    def partition(self) -> PartitionKey:
        return (self.tenant, self.context_key)


@dataclass(frozen=True, kw_only=True, slots=True)
class Neighbor:
    """A search result: an entry of the searched partition and its similarity to the query."""

    entry_id: str
    response_key: str
    similarity: float


@runtime_checkable
class VectorIndex(Protocol):
    """A store of `IndexEntry` searchable by similarity *within one (tenant, context_key) partition*.

    Contract (tests/unit/test_semantic_index.py runs it against every implementation):
    - `search` returns at most `k` neighbours of the named partition, best first; never an entry of another
      partition, whatever the data.
    - `add` of an existing `entry_id` replaces that entry.
    - `remove*` return how many entries they deleted; removed entries are never returned again.
    - Failures of an external backend raise `BackendError`.
    """

    @property
    def dim(self) -> int: ...

    def add(self, entries: Sequence[IndexEntry]) -> None: ...

    def search(self, vector: np.ndarray, *, tenant: str, context_key: str, k: int = 1) -> list[Neighbor]: ...

    def remove(self, entry_ids: Iterable[str]) -> int: ...

    def remove_tenant(self, tenant: str) -> int: ...

    def remove_response_keys(self, tenant: str, response_keys: Iterable[str]) -> int: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


def check_query(vector: np.ndarray, dim: int, k: int, tenant: str, context_key: str) -> np.ndarray:
    """`vector` as float32 (dim,), or ConfigError naming the bad argument."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"`k` must be an int >= 1, got {k!r}")
    for name, value in (("tenant", tenant), ("context_key", context_key)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"`{name}` must be a non-empty string, got {value!r}")
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    if query.shape[0] != dim:
        raise ConfigError(f"`vector` must have {dim} dimensions, got {query.shape[0]}")
    if not np.all(np.isfinite(query)):  # NaN scores would reach the decision rule as similarities
        raise ConfigError("`vector` must be finite (it holds NaN or infinity)")
    return query


def check_names(names: Iterable[str], name: str) -> None:
    """Refuse a bare str where ids are listed: it is iterable too, and its characters would be the ids."""
    if isinstance(names, str | bytes):
        raise ConfigError(f"`{name}` must be an iterable of str, not one {type(names).__name__}: {names!r}")


def check_entries(entries: Sequence[IndexEntry], dim: int) -> list[IndexEntry]:
    out = list(entries)
    for i, entry in enumerate(out):
        if not isinstance(entry, IndexEntry):
            raise ConfigError(f"`entries[{i}]` must be an IndexEntry, got {type(entry).__name__}")
        if entry.vector.shape[0] != dim:
            raise ConfigError(
                f"`entries[{i}].vector` must have {dim} dimensions, got {entry.vector.shape[0]}"
            )
    return out


class FlatPartition:
    """The vectors of one partition in a growable (capacity, dim) matrix. Exact search is one mat-vec.

    Removal swaps the last row into the hole: O(1), no tombstones.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vectors: Vectors = np.zeros((8, dim), dtype=np.float32)  # (capacity, dim)
        self.labels: list[int] = []  # row -> label
        self.rows: dict[int, int] = {}  # label -> row

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, label: int, vector: np.ndarray) -> None:
        if label in self.rows:
            self.vectors[self.rows[label]] = vector
            return
        n = len(self.labels)
        if n == self.vectors.shape[0]:  # amortised O(1): double the capacity
            grown = np.zeros((2 * n, self.dim), dtype=np.float32)
            grown[:n] = self.vectors[:n]
            self.vectors = grown
        self.vectors[n] = vector
        self.labels.append(label)
        self.rows[label] = n

    def remove(self, label: int) -> bool:
        row = self.rows.pop(label, None)
        if row is None:
            return False
        last = len(self.labels) - 1
        if row != last:
            moved = self.labels[last]
            self.vectors[row] = self.vectors[last]
            self.labels[row] = moved
            self.rows[moved] = row
        self.labels.pop()
        self.vectors[last] = 0  # no copy of a removed vector stays behind the live rows
        return True

    def remove_many(self, labels: Sequence[int]) -> None:
        for label in labels:
            self.remove(label)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = len(self.labels)
        if n == 0:
            return []
        scores = self.vectors[:n] @ query  # (n,)
        if k < n:
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
        else:
            top = np.argsort(-scores, kind="stable")
        return [(self.labels[i], float(scores[i])) for i in top]

    def items(self) -> Iterator[tuple[int, np.ndarray]]:
        for row, label in enumerate(self.labels):
            yield label, self.vectors[row]


@dataclass(slots=True)
class _Meta:
    entry_id: str
    partition: PartitionKey
    response_key: str


class PartitionedIndex:
    """Shared bookkeeping of the in-process indexes: entry ids ↔ integer labels, partitions, removal.

    Subclasses decide what a partition is (`_new_partition`) and may persist mutations (`_journal_*`).
    Every public method takes one lock: searches are short, and the maps must not change mid-search.
    """

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"`dim` must be an int >= 1, got {dim!r}")
        self._dim = dim
        self._lock = threading.RLock()
        self._partitions: dict[PartitionKey, FlatPartition | Partition] = {}
        self._meta: dict[int, _Meta] = {}  # label -> entry
        self._labels: dict[str, int] = {}  # entry_id -> label
        self._by_response: dict[tuple[str, str], set[int]] = {}  # (tenant, response_key) -> labels
        self._next_label = 1

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self._meta)

    def partition_sizes(self) -> dict[PartitionKey, int]:
        with self._lock:
            return {key: len(part) for key, part in self._partitions.items()}

    def add(self, entries: Sequence[IndexEntry]) -> None:
        items = check_entries(entries, self._dim)
        # One id named twice in a batch: the last wins, as a later `add` would (and as pgvector's upsert
        # does). Labelling both would leave the first in memory with no id pointing at it: unremovable.
        items = list({entry.entry_id: entry for entry in items}.values())
        with self._lock:
            labelled = []
            for entry in items:
                if entry.entry_id in self._labels:  # add() of an existing id replaces it
                    self._remove_labels([self._labels[entry.entry_id]])
                labelled.append((self._next_label, entry))
                self._next_label += 1
            self._journal_add(labelled)
            for label, entry in labelled:
                self._insert(label, entry)

    def _insert(self, label: int, entry: IndexEntry) -> None:
        part = self._partitions.get(entry.partition)
        if part is None:
            part = self._partitions[entry.partition] = self._new_partition()
        part.add(label, entry.vector)
        self._index_meta(label, entry)
        self._next_label = max(self._next_label, label + 1)
        self._partitions[entry.partition] = self._maybe_upgrade(part)

    def _index_meta(self, label: int, entry: IndexEntry) -> None:
        """Fill the id, label and response-key maps for `entry` (its vector is placed by the caller)."""
        self._meta[label] = _Meta(entry.entry_id, entry.partition, entry.response_key)
        self._labels[entry.entry_id] = label
        self._by_response.setdefault((entry.tenant, entry.response_key), set()).add(label)

    def search(self, vector: np.ndarray, *, tenant: str, context_key: str, k: int = 1) -> list[Neighbor]:
        query = check_query(vector, self._dim, k, tenant, context_key)
        with self._lock:
            part = self._partitions.get((tenant, context_key))
            if part is None:
                return []
            found = part.search(query, k)
            return [
                Neighbor(
                    entry_id=self._meta[label].entry_id,
                    response_key=self._meta[label].response_key,
                    similarity=sim,
                )
                for label, sim in found
                if label in self._meta
            ]

    def get(self, entry_id: str) -> tuple[PartitionKey, str] | None:
        """``((tenant, context_key), response_key)`` of `entry_id`, or None."""
        with self._lock:
            label = self._labels.get(entry_id)
            if label is None:
                return None
            meta = self._meta[label]
            return meta.partition, meta.response_key

    def remove(self, entry_ids: Iterable[str]) -> int:
        check_names(entry_ids, "entry_ids")
        with self._lock:
            labels = [self._labels[e] for e in entry_ids if e in self._labels]
            return self._remove_labels(labels)

    def remove_tenant(self, tenant: str) -> int:
        with self._lock:
            labels = [label for label, m in self._meta.items() if m.partition[0] == tenant]
            return self._remove_labels(labels)

    def remove_response_keys(self, tenant: str, response_keys: Iterable[str]) -> int:
        check_names(response_keys, "response_keys")
        with self._lock:
            labels = [lab for key in response_keys for lab in self._by_response.get((tenant, key), ())]
            return self._remove_labels(labels)

    def _remove_labels(self, labels: Sequence[int]) -> int:
        labels = [label for label in dict.fromkeys(labels) if label in self._meta]
        if not labels:
            return 0
        self._journal_remove(labels)
        touched: dict[PartitionKey, list[int]] = {}
        for label in labels:
            touched.setdefault(self._drop_meta(label), []).append(label)
        for key, group in touched.items():
            part = self._partitions[key]
            part.remove_many(group)  # scrubs the removed vectors from memory (see GraphPartition)
            if len(part) == 0:
                del self._partitions[key]
        self._removed_from(list(touched))
        return len(labels)

    def _drop_meta(self, label: int) -> PartitionKey:
        """Forget `label`'s entry id and response key; returns its partition."""
        meta = self._meta.pop(label)
        del self._labels[meta.entry_id]
        group = self._by_response.get((meta.partition[0], meta.response_key))
        if group is not None:
            group.discard(label)
            if not group:
                del self._by_response[(meta.partition[0], meta.response_key)]
        return meta.partition

    def entry_ids(self) -> list[str]:
        with self._lock:
            return list(self._labels)

    # Hooks for subclasses.
    def _new_partition(self) -> FlatPartition | Partition:
        return FlatPartition(self._dim)

    def _maybe_upgrade(self, part: FlatPartition | Partition) -> FlatPartition | Partition:
        return part

    def _journal_add(self, labelled: Sequence[tuple[int, IndexEntry]]) -> None:
        """Make `labelled` durable before it becomes visible (no-op in memory)."""

    def _journal_remove(self, labels: Sequence[int]) -> None:
        """Make the removal of `labels` durable (no-op in memory)."""

    def _removed_from(self, partitions: Sequence[PartitionKey]) -> None:
        """Entries of `partitions` were removed: drop any copy of their vectors kept elsewhere."""

    def close(self) -> None:
        """Release files; the in-memory index has none."""


class Partition(Protocol):
    def __len__(self) -> int: ...
    def add(self, label: int, vector: np.ndarray) -> None: ...
    def remove(self, label: int) -> bool: ...
    def remove_many(self, labels: Sequence[int]) -> None: ...
    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]: ...


class FlatIndex(PartitionedIndex):
    """Exact search: one numpy matrix per partition. O(n·dim) per search in the searched partition only.

    The reference the ANN indexes are measured against (recall@1), and the right choice for small
    partitions: below a few thousand vectors a mat-vec beats a graph walk.
    """
