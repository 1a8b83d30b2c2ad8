"""The shared-tier vector index: PostgreSQL + pgvector, HNSW over inner product.

One table per index (name chosen by the caller, so tests and deployments can share a database):

    entry_id text PRIMARY KEY, tenant text, context_key text, response_key text, created float8,
    embedding vector(dim)
    + btree (tenant, context_key), btree (tenant, response_key), hnsw (embedding vector_ip_ops)

Search is one statement::

    SELECT ... WHERE tenant = $1 AND context_key = $2 ORDER BY embedding <#> $3 LIMIT $k

so the tenant and context filter is applied by the database inside the search; no row of another partition
is ever read into the result. pgvector >= 0.8's iterative index scan (``hnsw.iterative_scan``) is switched on
per connection so a selective filter on an HNSW scan still returns `k` rows; on older pgvector the planner
falls back to the btree on (tenant, context_key) plus an exact sort, which is also correct.

Errors from psycopg are translated to `BackendError` here, at the one boundary.

Failures are bounded and transient: searches and adds run under ``statement_timeout`` (a lookup stuck
behind a lock — ``VACUUM FULL``, DDL — fails with `BackendError`, which the semantic cache turns into a
miss), and a connection the server ended (restart, failover, idle kill) is replaced on the next call.
Removals (erasure, invalidation) and `drop` use a second connection without the limit: they wait for
locks and finish, while lookups go on.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cachelm.errors import BackendError, ConfigError
from cachelm.semantic.index import IndexEntry, Neighbor, check_entries, check_names, check_query

_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,50}")
RECONNECT_INTERVAL_S = 1.0  # while the server is down, at most one connection attempt a second


class PgVectorIndex:
    """A `VectorIndex` in PostgreSQL. Thread-safe: one connection, statements serialised by a lock."""

    def __init__(
        self,
        url: str,
        dim: int,
        *,
        table: str = "cachelm_semantic",
        connectivity: int = 16,
        expansion_add: int = 64,
        expansion_search: int = 100,
        connect_timeout: float = 5.0,
        statement_timeout: float | None = 5.0,
    ) -> None:
        """`statement_timeout` (seconds, None: no limit) bounds every search and add after set-up, lock
        waits included, so a blocked lookup is a miss; removals (erasure, invalidation) run unbounded, on
        a second connection, so they neither fail on a slow lock nor hold lookups up."""
        if not isinstance(url, str) or not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(f"`url` must be a postgresql:// URL, got {url!r}")
        if not isinstance(dim, int) or not 1 <= dim <= 16000:
            raise ConfigError(f"`dim` must be an int in [1, 16000], got {dim!r}")
        if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
            raise ConfigError(f"`table` must match {_TABLE_NAME.pattern}, got {table!r}")
        for name, value in (
            ("connectivity", connectivity),
            ("expansion_add", expansion_add),
            ("expansion_search", expansion_search),
        ):
            if not isinstance(value, int) or value < 2:
                raise ConfigError(f"`{name}` must be an int >= 2, got {value!r}")
        if statement_timeout is not None and (
            isinstance(statement_timeout, bool)
            or not isinstance(statement_timeout, float | int)
            or not (math.isfinite(statement_timeout) and statement_timeout > 0)
        ):
            raise ConfigError(
                f"`statement_timeout` must be None or a number of seconds > 0, got {statement_timeout!r}"
            )
        self._dim = dim
        self.table = table
        self._lock = threading.Lock()  # the serving connection: searches and adds
        # Removals run on a connection of their own, opened when first needed and not time-limited: an
        # erasure that waits for a lock must finish, and must not hold up lookups meanwhile.
        self._admin_lock = threading.Lock()
        self._admin_conn: Any = None
        self._closed = False
        self._url = url
        self._connect_timeout = int(max(1, connect_timeout))
        self._expansion_search = int(expansion_search)
        self._timeout_ms = None if statement_timeout is None else max(1, round(1000 * statement_timeout))
        self._last_attempt = -math.inf
        try:
            import psycopg
            from pgvector.psycopg import register_vector
        except ImportError as exc:
            raise ConfigError("PgVectorIndex needs `pip install cachelm[postgres]`") from exc
        self._psycopg = psycopg
        self._register_vector = register_vector
        self._conn: Any = self._connect()
        try:
            self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self._create(connectivity, expansion_add)
            self._configure(self._conn)
        except (psycopg.Error, ConfigError) as exc:
            self._conn.close()  # a failed set-up (or a table of another `dim`) must not leak the connection
            if isinstance(exc, ConfigError):
                raise
            raise BackendError(f"pgvector index {table}: {exc}") from exc

    def _configure(self, conn: Any, *, bounded: bool = True) -> None:
        """The per-connection settings (the vector type adapter, search width, time limit)."""
        self._register_vector(conn)
        conn.execute(f"SET hnsw.ef_search = {self._expansion_search}")
        # pgvector < 0.8 lacks iterative scans: the btree + exact sort fallback is still correct.
        with contextlib.suppress(self._psycopg.Error):
            conn.execute("SET hnsw.iterative_scan = relaxed_order")
        if bounded and self._timeout_ms is not None:
            conn.execute(f"SET statement_timeout = {self._timeout_ms}")

    def _connect(self) -> Any:
        """A new autocommit connection; BackendError when the server cannot be reached."""
        try:
            return self._psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout)
        except self._psycopg.Error as exc:
            raise BackendError(f"pgvector index {self.table}: {exc}") from exc

    def _open(self, *, bounded: bool) -> Any:
        """A new configured connection; BackendError when the server cannot be reached."""
        conn = self._connect()
        try:
            self._configure(conn, bounded=bounded)
        except self._psycopg.Error as exc:
            conn.close()
            raise BackendError(f"pgvector index {self.table}: connecting: {exc}") from exc
        return conn

    def _serving(self) -> Any:
        """The serving connection (under `_lock`), replaced when the server ended it; BackendError while
        the server stays down, with at most one attempt a second."""
        if self._conn.broken:  # ended by the server, not by `close`
            now = time.monotonic()
            if now - self._last_attempt < RECONNECT_INTERVAL_S:
                raise BackendError(f"pgvector index {self.table}: the connection was lost, reconnecting")
            self._last_attempt = now
            self._conn = self._open(bounded=True)
        return self._conn

    def _admin(self) -> Any:
        """The removals' connection (under `_admin_lock`), opened or replaced as needed."""
        if self._closed:
            raise BackendError(f"pgvector index {self.table} is closed")
        if self._admin_conn is None or self._admin_conn.broken:
            self._admin_conn = self._open(bounded=False)
        return self._admin_conn

    def _create(self, connectivity: int, expansion_add: int) -> None:
        t = self.table
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {t} (entry_id text PRIMARY KEY, tenant text NOT NULL,"
            f" context_key text NOT NULL, response_key text NOT NULL, created float8 NOT NULL,"
            f" embedding vector({self._dim}) NOT NULL)"
        )
        row = self._conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attname = 'embedding'",
            (t,),
        ).fetchone()
        if row is None or row[0] != f"vector({self._dim})":
            raise ConfigError(f"`dim` is {self._dim} but table {t} stores {row[0] if row else 'nothing'}")
        self._conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_part ON {t} (tenant, context_key)")
        self._conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_resp ON {t} (tenant, response_key)")
        self._conn.execute(
            f"CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding vector_ip_ops)"
            f" WITH (m = {int(connectivity)}, ef_construction = {int(expansion_add)})"
        )

    @property
    def dim(self) -> int:
        return self._dim

    def _run(self, sql: str, params: Any = None, *, many: bool = False, admin: bool = False) -> Any:
        """Run one statement on the serving connection, or with `admin` on the removals' connection (no
        `statement_timeout`: an erasure of a large tenant must finish, not be rolled back)."""
        with self._admin_lock if admin else self._lock:
            conn = self._admin() if admin else self._serving()
            try:
                if many:
                    with conn.cursor() as cur:
                        cur.executemany(sql, params)
                        return cur.rowcount
                return conn.execute(sql, params)
            except self._psycopg.Error as exc:
                raise BackendError(f"pgvector index {self.table}: {exc}") from exc

    def add(self, entries: Sequence[IndexEntry]) -> None:
        items = check_entries(entries, self._dim)
        if not items:
            return
        rows = [(e.entry_id, e.tenant, e.context_key, e.response_key, e.created, e.vector) for e in items]
        self._run(
            f"INSERT INTO {self.table} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (entry_id) DO UPDATE SET"
            " tenant = EXCLUDED.tenant, context_key = EXCLUDED.context_key,"
            " response_key = EXCLUDED.response_key, created = EXCLUDED.created,"
            " embedding = EXCLUDED.embedding",
            rows,
            many=True,
        )

    def search(self, vector: np.ndarray, *, tenant: str, context_key: str, k: int = 1) -> list[Neighbor]:
        query = check_query(vector, self._dim, k, tenant, context_key)
        rows = self._run(
            f"SELECT entry_id, response_key, -(embedding <#> %s) AS sim FROM {self.table}"
            " WHERE tenant = %s AND context_key = %s ORDER BY embedding <#> %s LIMIT %s",
            (query, tenant, context_key, query, k),
        ).fetchall()
        # relaxed_order may return rows slightly out of order: sort here.
        found = [Neighbor(entry_id=r[0], response_key=r[1], similarity=float(r[2])) for r in rows]
        return sorted(found, key=lambda n: -n.similarity)

    def remove(self, entry_ids: Iterable[str]) -> int:
        check_names(entry_ids, "entry_ids")
        ids = list(dict.fromkeys(entry_ids))
        if not ids:
            return 0
        return int(
            self._run(f"DELETE FROM {self.table} WHERE entry_id = ANY(%s)", (ids,), admin=True).rowcount
        )

    def remove_tenant(self, tenant: str) -> int:
        deleted = self._run(f"DELETE FROM {self.table} WHERE tenant = %s", (tenant,), admin=True)
        return int(deleted.rowcount)

    def remove_response_keys(self, tenant: str, response_keys: Iterable[str]) -> int:
        check_names(response_keys, "response_keys")
        keys = list(dict.fromkeys(response_keys))
        if not keys:
            return 0
        return int(
            self._run(
                f"DELETE FROM {self.table} WHERE tenant = %s AND response_key = ANY(%s)",
                (tenant, keys),
                admin=True,
            ).rowcount
        )

    def get(self, entry_id: str) -> tuple[tuple[str, str], str] | None:
        row = self._run(
            f"SELECT tenant, context_key, response_key FROM {self.table} WHERE entry_id = %s", (entry_id,)
        ).fetchone()
        return None if row is None else ((row[0], row[1]), row[2])

    def __len__(self) -> int:
        return int(self._run(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def drop(self) -> None:
        """Drop the table (tests and `cachelm purge --all`)."""
        self._run(f"DROP TABLE IF EXISTS {self.table}", admin=True)

    def close(self) -> None:
        with self._lock, self._admin_lock:
            self._closed = True
            self._conn.close()
            if self._admin_conn is not None:
                self._admin_conn.close()
