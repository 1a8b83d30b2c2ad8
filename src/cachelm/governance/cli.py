"""``cachelm feedback bad``, ``cachelm refresh`` and the index side of ``cachelm purge`` (see `cachelm.cli`).

They open the store as the other commands do (``--store``, ``$CACHELM_STORE``, the SQLite default; keys
salted with ``$CACHELM_KEY_SECRET``, values sealed with ``$CACHELM_KEYRING``) and the semantic index the
proxy uses for that store, when there is one:

- ``--pg-url URL`` (or ``$CACHELM_PG_URL``): the shared pgvector table (``--pg-table``, default
  ``cachelm_semantic``, the proxy's for namespace ``cachelm``);
- else the persisted HNSW index beside a SQLite store (``<file>.semantic.sqlite``), if it exists. It is
  owned by one process at a time: with the proxy running on it the command fails (exit 1) — stop the
  proxy, use pgvector, or pass ``--no-semantic`` (answers are still removed, and a semantic entry pointing
  at a removed answer is a miss);
- ``--embedder`` must be the proxy's (``minilm`` by default, ``hashing``): vectors of one model only compare
  with vectors of the same model.

The decision rule's statistics live in the serving process: the negative outcome `mark_bad` reports here
reaches only this process's rule. Exit status: 0 done, 1 a store/index failure or (refresh) any entry
failed, 2 bad input, 130 interrupted (refresh: the job is cancelled cleanly first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import IO, Any

from cachelm.governance.core import Governance
from cachelm.governance.journal import is_log_key
from cachelm.governance.refresh import RefreshProgress
from cachelm.governance.upstream import http_recompute
from cachelm.response.exact import ExactCache
from cachelm.semantic.cache import SemanticCache
from cachelm.store.base import Match, Store

PROGRESS_EVERY_S = 2.0


def _semantic(args: argparse.Namespace, store: Store, secret: bytes) -> SemanticCache | None:
    from cachelm.cli import semantic_index_of

    pg_url, db = semantic_index_of(args)
    if pg_url is None and db is None:
        return None  # this store has no semantic index (or --no-semantic)
    from cachelm.semantic.embedder import Embedder, HashingEmbedder, MiniLMEmbedder
    from cachelm.semantic.embedding_cache import EmbeddingCache
    from cachelm.semantic.index import VectorIndex

    embedder: Embedder = HashingEmbedder() if args.embedder == "hashing" else MiniLMEmbedder()
    index: VectorIndex
    if pg_url:
        from cachelm.semantic.pgvector import PgVectorIndex

        index = PgVectorIndex(pg_url, embedder.dim, table=args.pg_table)
    else:
        from cachelm.cli import env_keyring
        from cachelm.semantic.hnsw import HNSWIndex

        index = HNSWIndex(embedder.dim, path=db, keyring=env_keyring())  # sealed as the server seals it
    return SemanticCache(embedder=EmbeddingCache(store, embedder), index=index, tenant_secret=secret)


def _governance(args: argparse.Namespace, store: Store) -> Governance:
    secret = os.environ.get("CACHELM_KEY_SECRET", "").encode()
    semantic = _semantic(args, store, secret)
    return Governance(ExactCache(store, key_secret=secret), semantic=semantic)


def purge_with_index(args: argparse.Namespace, store: Store, where: Match) -> tuple[int, int]:
    """`cachelm purge` of a store with a semantic index: the vectors of the purged answers leave the index
    too, as with the proxy's ``/admin/purge`` and ``/admin/erase`` (a question's vector is the user's data).
    Returns ``(records purged, vectors removed)``. The index is opened first, so a purge that cannot
    reach it (the proxy holds it) deletes nothing."""
    semantic = _semantic(args, store, os.environ.get("CACHELM_KEY_SECRET", "").encode())
    assert semantic is not None  # the caller checked that the store has an index
    try:
        if args.all:  # every tenant the index holds, also entries whose answer is already gone
            tenants = _index_tenants(semantic.index)
            count = store.clear()
            return count, sum(semantic.remove_tenant(t) for t in tenants)
        if where == Match(tenant=where.tenant):  # a whole tenant
            count = store.purge(where)
            return count, semantic.remove_tenant(str(where.tenant))
        doomed: dict[str, list[str]] = {}
        for record in store.scan(where):
            if not is_log_key(record.key):
                doomed.setdefault(record.tenant, []).append(record.key)
        count = store.purge(where)
        return count, sum(semantic.remove_keys(tenant, keys) for tenant, keys in doomed.items())
    finally:
        semantic.close()


def _index_tenants(index: Any) -> set[str]:
    from cachelm.semantic.index import PartitionedIndex

    if isinstance(index, PartitionedIndex):
        return {tenant for tenant, _ in index.partition_sizes()}
    rows = index._run(f"SELECT DISTINCT tenant FROM {index.table}").fetchall()  # PgVectorIndex
    return {str(tenant) for (tenant,) in rows}


def cmd_feedback(args: argparse.Namespace, out: IO[str]) -> int:
    from cachelm.cli import _open

    with _open(args.store) as store:
        gov = _governance(args, store)
        try:
            report = gov.mark_bad(args.key, tenant=args.tenant, similarity=args.similarity)
        finally:
            if gov.semantic is not None:
                gov.semantic.close()
    if args.json:
        out.write(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        return 0
    answers, entries = len(report.response_keys), len(report.entries)
    out.write(
        f"removed {answers} answer{'' if answers == 1 else 's'} and {entries} semantic "
        f"entr{'y' if entries == 1 else 'ies'} of tenant {report.tenant} (similarity >= {args.similarity})\n"
    )
    if not report.response_keys:
        out.write(f"  no answer of tenant {report.tenant} under {report.response_key}\n")
    for entry in report.entries:
        out.write(f"  {entry.response_key}  similarity {entry.similarity:.3f}\n")
    if gov.semantic is None or not report.neighbours_searched:
        out.write("  (no semantic index or vector for this answer: neighbours were not searched)\n")
    return 0


def cmd_refresh(args: argparse.Namespace, out: IO[str]) -> int:
    from cachelm.cli import _open

    budget: int | float = args.budget if args.budget is not None else args.budget_usd
    recompute = http_recompute(
        args.upstream, api_key=os.environ.get("CACHELM_UPSTREAM_API_KEY"), timeout=args.timeout
    )
    with _open(args.store) as store:
        gov = _governance(args, store)
        try:
            job = gov.refresh_on_model_change(
                args.model, args.revision, recompute=recompute, budget=budget, tenant=args.tenant
            )
            print(
                f"refreshing {job.plan.model} → revision {job.plan.revision!r}: {len(job.plan.planned)} of "
                f"{job.plan.old_entries} old entries ({job.plan.unlogged} without a logged request)",
                file=sys.stderr,
            )
            interrupted = _follow(job)
            final = job.result()
        finally:
            if gov.semantic is not None:
                gov.semantic.close()
    _summary(final, out, as_json=args.json)
    if interrupted:
        return 130
    return 1 if final.failed else 0


def _follow(job: Any) -> bool:
    """Wait for `job`, printing progress to stderr; Ctrl-C cancels it cleanly. True if interrupted."""
    shown = -1
    try:
        while not job.wait(PROGRESS_EVERY_S):
            p = job.progress
            if p.processed != shown:
                shown = p.processed
                print(f"  {p.processed}/{p.planned} done, {p.failed} failed", file=sys.stderr)
    except KeyboardInterrupt:
        job.cancel()
        job.wait()
        return True
    return False


def _summary(p: RefreshProgress, out: IO[str], *, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(dataclasses.asdict(p), indent=2) + "\n")
        return
    out.write(
        f"{p.state}: {p.refreshed} refreshed, {p.already_fresh} already fresh, {p.failed} failed, "
        f"{p.dropped} dropped of {p.old_entries} (estimated spend ${p.spent_usd:.6f})\n"
    )
    for error in p.errors:
        out.write(f"  failed {error}\n")
