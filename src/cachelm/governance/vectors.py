"""Read back the semantic entries (vectors included) that point at one response key.

`mark_bad(response_key)` needs the bad entry's vector to find its neighbours. When the request log holds
the request, the vector is recomputed from its last user turn and nothing here is used. For answers
written without the log (the proxy today), the vector must come from the index — and the `VectorIndex`
protocol has no read-back method. Until it gets one (``entries_for_response_key(tenant, response_key)``,
asked of the semantic layer's owner), this module reads the shipped indexes directly:

- any index with an ``entries_for_response_key`` method: that method (the intended protocol extension);
- `FlatIndex` / `HNSWIndex` (`PartitionedIndex`): the in-memory maps, under the index's own lock;
  vectors of graph partitions come from ``GraphPartition.vectors_of`` (the graph library's own read);
- `PgVectorIndex`: one ``SELECT`` on its table.

Anything else returns no entries: `mark_bad` then removes only the entries pointing at the key itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cachelm.semantic.index import FlatPartition, IndexEntry, PartitionedIndex, VectorIndex


def entries_for_response_key(index: VectorIndex, tenant: str, response_key: str) -> list[IndexEntry]:
    """The entries of `tenant` in `index` whose response key is `response_key` (see module docstring)."""
    method = getattr(index, "entries_for_response_key", None)
    if callable(method):
        return list(method(tenant, response_key))
    if isinstance(index, PartitionedIndex):
        return _partitioned(index, tenant, response_key)
    from cachelm.semantic.pgvector import PgVectorIndex

    if isinstance(index, PgVectorIndex):
        return _pgvector(index, tenant, response_key)
    return []


def _partitioned(index: PartitionedIndex, tenant: str, response_key: str) -> list[IndexEntry]:
    # Private state of PartitionedIndex, read under its lock (see the module docstring for why).
    out = []
    with index._lock:
        for label in sorted(index._by_response.get((tenant, response_key), ())):
            meta = index._meta[label]
            vector = _vector(index._partitions[meta.partition], label)
            if vector is None:
                continue
            out.append(
                IndexEntry(
                    entry_id=meta.entry_id,
                    tenant=meta.partition[0],
                    context_key=meta.partition[1],
                    response_key=meta.response_key,
                    vector=vector,
                )
            )
    return out


def _vector(part: Any, label: int) -> np.ndarray | None:
    if isinstance(part, FlatPartition):
        row = part.rows.get(label)
        return None if row is None else np.array(part.vectors[row], dtype=np.float32)
    vectors_of = getattr(part, "vectors_of", None)  # `hnsw.GraphPartition`
    if vectors_of is None or label not in part.labels:
        return None
    return np.asarray(vectors_of([label])[0], dtype=np.float32)


def _pgvector(index: Any, tenant: str, response_key: str) -> list[IndexEntry]:
    rows = index._run(
        f"SELECT entry_id, context_key, embedding FROM {index.table}"
        " WHERE tenant = %s AND response_key = %s ORDER BY entry_id",
        (tenant, response_key),
    ).fetchall()
    out = []
    for entry_id, context_key, raw in rows:
        vector = raw.to_numpy() if hasattr(raw, "to_numpy") else raw  # pgvector's `Vector` type
        out.append(
            IndexEntry(
                entry_id=entry_id,
                tenant=tenant,
                context_key=context_key,
                response_key=response_key,
                vector=np.asarray(vector, dtype=np.float32),
            )
        )
    return out
