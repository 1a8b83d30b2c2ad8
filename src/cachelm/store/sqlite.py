"""The embedded default record store: one SQLite file in WAL mode.

Layout (schema version ``SCHEMA_VERSION``)::

    settings(name PRIMARY KEY, value)          the settings the store was created with (JSON values)
    records(id INTEGER PRIMARY KEY, key UNIQUE, value BLOB, meta JSON, checksum BLOB, hits,
            tenant, user, model, created, expires)   indexed copies of the meta fields, for SQL purges
    tags(tag, rid)                              one row per (tag, record); a trigger deletes a record's rows

Why these choices:

- WAL mode: readers never block the writer and a killed process leaves a consistent database (a transaction
  is either in the WAL with its commit frame or ignored). ``synchronous=NORMAL`` (the default setting) can
  lose the last transactions on *power* loss but never on a process crash; ``FULL`` survives power loss.
- Hit counts are **eventually durable**: ``get`` counts a hit in memory and the counts are written in one
  batch when ``hit_flush_threshold`` hits are pending (by that ``get``), every ``hit_flush_interval_s`` (by a
  daemon thread the store starts on its first hit), and on ``close``. A hit therefore costs one indexed
  SELECT, not a write transaction. Reads through this store object (``peek``, ``scan``) include the pending
  counts; another process sees them after the flush; a crash loses at most the pending counts. While a
  flush runs concurrently, the ``hits`` of a record returned by ``get``/``peek`` may be transiently off by
  the flushed amount; the stored totals are exact.
- One connection per thread: Python's sqlite3 connections must not be used concurrently, and separate
  connections let WAL serve reads in parallel. Writes from this process are serialised by a lock (SQLite
  allows one writer anyway), which also orders hit flushes against puts and deletes.
- Erasure leaves the file: ``secure_delete`` zeroes the bytes of deleted rows in the database pages, and
  ``purge`` and ``clear`` end with a ``TRUNCATE`` checkpoint, which writes the zeroed pages into the file and
  empties the WAL (that would otherwise keep the old page images until it is reused). A reader holding an
  older snapshot (an unfinished `scan`) blocks that checkpoint: the purge then raises ``BackendError`` after
  the busy timeout, its records already deleted, and running it again finishes the job.
- Tags live in a side table with a (tag, rid) primary key, so purging a tag is an index range scan and a
  record's tags are replaced without rewriting JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachelm.clock import Clock, wall_clock
from cachelm.errors import BackendError, ConfigError
from cachelm.store.base import Match, PendingHits, Record, Store, check_key, record_from_meta

SCHEMA_VERSION = 1
_SCAN_BATCH = 512  # rows per scan query: bounded memory, and no read transaction held across a generator

_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        value BLOB NOT NULL,
        meta TEXT NOT NULL,
        checksum BLOB NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        tenant TEXT NOT NULL,
        user TEXT NOT NULL,
        model TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL
    )""",
    "CREATE INDEX IF NOT EXISTS records_tenant_user ON records (tenant, user)",
    "CREATE INDEX IF NOT EXISTS records_user ON records (user)",
    "CREATE INDEX IF NOT EXISTS records_model ON records (model)",
    "CREATE INDEX IF NOT EXISTS records_created ON records (created)",
    "CREATE INDEX IF NOT EXISTS records_expires ON records (expires) WHERE expires IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, rid INTEGER NOT NULL, PRIMARY KEY (tag, rid)) "
    "WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS tags_rid ON tags (rid)",
    # A trigger, not a foreign key: foreign keys need a per-connection pragma, triggers always run.
    "CREATE TRIGGER IF NOT EXISTS records_delete_tags AFTER DELETE ON records "
    "BEGIN DELETE FROM tags WHERE rid = old.id; END",
)

# Read as BLOBs whatever type a damaged row holds: a TEXT cell with invalid UTF-8 would otherwise make
# Python's sqlite3 fail the whole fetch (and a scan) instead of reporting one corrupt record. The key too:
# a garbled key cell made every scan fail. A key that is not TEXT reads as NULL (corrupt): `get` and the
# UNIQUE constraint compare it to TEXT keys, which it never equals.
_COLUMNS = (
    "id, CASE WHEN typeof(key) = 'text' THEN CAST(key AS BLOB) END, CAST(value AS BLOB), "
    "CAST(meta AS BLOB), CAST(checksum AS BLOB), hits"
)
# A read-path delete of a corrupt row: only while the row still holds the bytes that were read.
_SAME_ROW = "id = ? AND CAST(value AS BLOB) IS ? AND CAST(meta AS BLOB) IS ? AND CAST(checksum AS BLOB) IS ?"

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclass(frozen=True, kw_only=True)
class SQLiteSettings:
    """Settings persisted in the database's `settings` table and restored when it is reopened.

    Arguments passed explicitly when opening override the stored ones (and are stored); the rest are read
    back from the file, so a store reopened with no arguments behaves as it was created.
    """

    synchronous: str = "NORMAL"
    busy_timeout_s: float = 5.0
    hit_flush_interval_s: float = 1.0
    hit_flush_threshold: int = 1000
    max_size_bytes: int | None = None  # a cap on the file; writes past it raise BackendError (SQLITE_FULL)
    cache_size_kib: int = 8192

    def __post_init__(self) -> None:
        if self.synchronous not in _SYNCHRONOUS:
            raise ConfigError(f"`synchronous` must be one of {_SYNCHRONOUS}, got {self.synchronous!r}")
        for name in ("busy_timeout_s", "hit_flush_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"`{name}` must be a number >= 0, got {value!r}")
        if not isinstance(self.hit_flush_threshold, int) or self.hit_flush_threshold < 1:
            raise ConfigError(f"`hit_flush_threshold` must be an int >= 1, got {self.hit_flush_threshold!r}")
        if self.max_size_bytes is not None and (
            not isinstance(self.max_size_bytes, int) or self.max_size_bytes < 64 * 1024
        ):
            raise ConfigError(
                f"`max_size_bytes` must be None or an int >= 65536, got {self.max_size_bytes!r}"
            )
        if not isinstance(self.cache_size_kib, int) or self.cache_size_kib < 0:
            raise ConfigError(f"`cache_size_kib` must be an int >= 0, got {self.cache_size_kib!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _backend_error(action: str, path: str, exc: sqlite3.Error) -> BackendError:
    return BackendError(f"sqlite store {path!r}: {action} failed: {exc}")


class SQLiteStore(Store):
    """Records in one SQLite file (WAL). O(log n) get/put/delete; purge by any `Match` field is one DELETE.

    A corrupt record (checksum mismatch or undecodable metadata) reads as a miss, is deleted, and counts in
    ``stats.corrupt_reads``. Any ``sqlite3`` error (disk full, unreadable file, lock timeout) raises
    ``BackendError``. Hit counts are eventually durable (see the module docstring).
    """

    def __init__(self, path: str | Path, *, clock: Clock = wall_clock, **settings: Any) -> None:
        super().__init__(clock=clock)
        unknown = set(settings) - set(SQLiteSettings.field_names())
        if unknown:
            raise ConfigError(
                f"unknown sqlite setting(s) {sorted(unknown)}; known: {list(SQLiteSettings.field_names())}"
            )
        SQLiteSettings(**settings)  # validate the explicit ones before touching the file
        self.path = str(path)
        if self.path == ":memory:" or self.path.startswith("file:"):
            # Each thread has its own connection, and each connection to ":memory:" is a separate database.
            raise ConfigError(f"`path` must be a file path, got {self.path!r}; use memory:// for RAM only")
        if Path(self.path).is_dir():
            raise ConfigError(f"`path` must be a file, got the directory {self.path!r}")
        self.url = f"sqlite:///{Path(self.path).resolve()}"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._pending = PendingHits()
        self._flusher_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        # Bootstrap with defaults so the first connection can open; the stored settings replace them below.
        self.settings = SQLiteSettings()
        self.settings = self._init_schema(settings)
        self._configure(self._conn())

    # -- connections -------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: autocommit; transactions are explicit BEGIN IMMEDIATE blocks, so a writer
            # takes the write lock up front instead of failing with SQLITE_BUSY on lock upgrade.
            conn = sqlite3.connect(
                self.path, timeout=self.settings.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._configure(conn)
        except sqlite3.Error as exc:
            raise _backend_error("open", self.path, exc) from exc
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        s = self.settings
        self._enable_wal(conn)
        conn.execute(f"PRAGMA synchronous={s.synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(s.busy_timeout_s * 1000)}")
        conn.execute(f"PRAGMA cache_size={-s.cache_size_kib}")
        conn.execute("PRAGMA secure_delete=ON")  # a deleted record's bytes are zeroed, not left in free space
        if s.max_size_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(1, s.max_size_bytes // page_size)}")

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL, waiting up to the busy timeout. SQLite does not call the busy handler for this
        switch, so while another process holds a lock on a file not yet in WAL mode (it is opening the same
        new file) the pragma fails at once with "database is locked": retry it instead."""
        deadline = time.monotonic() + self.settings.busy_timeout_s
        delay = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise BackendError(f"sqlite store {self.path!r} is closed")
            conn = self._connect()
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _init_schema(self, explicit: dict[str, Any]) -> SQLiteSettings:
        """Create the tables if missing; merge stored settings with `explicit` ones and store the result."""
        conn = self._conn()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                stored = dict(conn.execute("SELECT name, value FROM settings").fetchall())
                settings = self._merge_settings(stored, explicit)
                rows = [("schema_version", json.dumps(SCHEMA_VERSION))]
                rows += [(name, json.dumps(getattr(settings, name))) for name in SQLiteSettings.field_names()]
                conn.executemany("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.close()
                if isinstance(exc, sqlite3.Error):
                    raise _backend_error("open", self.path, exc) from exc
                raise
        return settings

    def _merge_settings(self, stored: dict[str, str], explicit: dict[str, Any]) -> SQLiteSettings:
        try:
            version = json.loads(stored.pop("schema_version", str(SCHEMA_VERSION)))
            values = {k: json.loads(v) for k, v in stored.items() if k in SQLiteSettings.field_names()}
        except ValueError:
            raise ConfigError(f"{self.path!r}: the settings table is unreadable: {stored!r}") from None
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path!r} has store schema version {version}; this cachelm reads {SCHEMA_VERSION}"
            )
        try:
            return SQLiteSettings(**{**values, **explicit})
        except ConfigError as exc:
            raise ConfigError(f"{self.path!r}: {exc}") from None

    # -- reads -------------------------------------------------------------------------------------------

    def _decode(self, row: Sequence[Any]) -> Record | None:
        """Row (id, key, value, meta, checksum, hits) → Record, or None when it fails its checksum."""
        _, key, value, meta, checksum, hits = row
        try:
            key, meta_json = key.decode(), meta.decode()
        except (AttributeError, UnicodeDecodeError):  # NULL or not UTF-8
            return None
        if not isinstance(value, bytes) or not isinstance(hits, int):
            return None
        return decode_verified(key, value, meta_json, checksum, hits)

    def _corrupt(self, row: Sequence[Any]) -> None:
        """Count and drop a row that failed `_decode`, unless a writer has replaced it since it was read."""
        self.stats.add("corrupt_reads")
        rid, key, value, meta, checksum, _ = row
        try:
            text_key: str | None = key.decode()
        except (AttributeError, UnicodeDecodeError):  # a garbled key: no pending hits can be under it
            text_key = None
        self._delete_quietly(_SAME_ROW, [rid, value, meta, checksum], text_key)

    def _read(self, key: str, op: str) -> Record | None:
        """The stored record under `key` as written (expired or not), or None; a corrupt one is dropped."""
        check_key(key)
        try:
            row = self._conn().execute(f"SELECT {_COLUMNS} FROM records WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self.stats.add("errors")
            raise _backend_error(op, self.path, exc) from exc
        if row is None:
            return None
        record = self._decode(row)
        if record is None:
            self._corrupt(row)
        return record

    def get(self, key: str) -> Record | None:
        record = self._read(key, "get")
        if record is None:
            return None
        now = self.clock()
        if record.expired(now):
            # Only while still expired: another writer may have put a fresh record since the read.
            self._delete_quietly("key = ? AND expires <= ?", [key, now], key)
            return None
        pending = self._count_hits(key, 1)
        return record.with_hits(record.hits + pending) if pending else record

    def add_hits(self, counts: Mapping[str, int]) -> None:
        """Counted like `get`'s hits (pending, flushed in a batch); a key without a row gains nothing."""
        for key, n in self.check_hits(counts).items():
            self._count_hits(key, n)

    def _count_hits(self, key: str, n: int) -> int:
        """Add `n` pending hits to `key` (flushing when due); the hits that were pending before."""
        before = self._pending.add(key, n)
        if self._flusher is None:
            with self._flusher_lock:
                if self._flusher is None:
                    self._start_flusher()
        if self._pending.total >= self.settings.hit_flush_threshold:
            self.flush_hits(raise_errors=False)
        return before

    def peek(self, key: str) -> Record | None:
        record = self._read(key, "peek")
        return None if record is None or record.expired(self.clock()) else self._with_pending(record)

    def _with_pending(self, record: Record) -> Record:
        pending = self._pending.of(record.key)
        return record.with_hits(record.hits + pending) if pending else record

    def scan(self, where: Match | None = None) -> Iterator[Record]:
        sql, params = _where_sql(where or Match(), live_at=self.clock())
        return self._scan(sql, params)

    def _scan_all(self) -> Iterator[Record]:
        return self._scan("1", [])

    def _scan(self, where_sql: str, params: list[Any]) -> Iterator[Record]:
        last_id = -1
        while True:
            try:
                rows = (
                    self._conn()
                    .execute(
                        f"SELECT {_COLUMNS} FROM records "
                        f"WHERE id > ? AND ({where_sql}) ORDER BY id LIMIT {_SCAN_BATCH}",
                        [last_id, *params],
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                self.stats.add("errors")
                raise _backend_error("scan", self.path, exc) from exc
            for row in rows:
                record = self._decode(row)
                if record is None:
                    self._corrupt(row)
                    continue
                yield self._with_pending(record)
            if len(rows) < _SCAN_BATCH:
                return
            last_id = rows[-1][0]

    def __len__(self) -> int:
        try:
            return int(self._conn().execute("SELECT count(*) FROM records").fetchone()[0])
        except sqlite3.Error as exc:
            raise _backend_error("count", self.path, exc) from exc

    # -- writes ------------------------------------------------------------------------------------------

    def _write(self, action: str, sql_steps: Any) -> Any:
        """Run `sql_steps(conn)` in one BEGIN IMMEDIATE transaction; on error: roll back, BackendError."""
        conn = self._conn()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = sql_steps(conn)
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.stats.add("errors")
                raise _backend_error(action, self.path, exc) from exc

    def put(self, record: Record) -> None:
        if not isinstance(record, Record):
            raise ConfigError(f"`record` must be a Record, got {type(record).__name__}")
        row = (
            record.key,
            record.value,
            record.meta_json(),
            record.checksum(),
            record.hits,
            record.tenant,
            record.user,
            record.model,
            record.created,
            record.expires,
        )

        def steps(conn: sqlite3.Connection) -> None:
            # An upsert keeps the row id, so the tags of the old record are replaced explicitly below.
            (rid,) = conn.execute(
                "INSERT INTO records (key, value, meta, checksum, hits, tenant, user, model, created, "
                "expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "meta = excluded.meta, checksum = excluded.checksum, hits = excluded.hits, "
                "tenant = excluded.tenant, user = excluded.user, model = excluded.model, "
                "created = excluded.created, expires = excluded.expires RETURNING id",
                row,
            ).fetchone()
            conn.execute("DELETE FROM tags WHERE rid = ?", (rid,))
            if record.tags:
                conn.executemany("INSERT INTO tags (tag, rid) VALUES (?, ?)", [(t, rid) for t in record.tags])

        with self._write_lock:
            self._write("put", steps)
            self._pending.drop(record.key)  # hits counted on the replaced record must not move to the new one

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._write_lock:
            deleted = self._write(
                "delete", lambda conn: conn.execute("DELETE FROM records WHERE key = ?", (key,)).rowcount
            )
            self._pending.drop(key)
        return bool(deleted)

    def _delete_quietly(self, where_sql: str, params: list[Any], key: str | None) -> None:
        """Delete on the read path (an expired or corrupt row) what `where_sql` still matches, so a record
        written since the read survives; a failure leaves the row for the next reader."""
        sql = f"DELETE FROM records WHERE {where_sql}"
        with contextlib.suppress(BackendError), self._write_lock:
            deleted = self._write("delete", lambda conn: conn.execute(sql, params).rowcount)
            if deleted and key is not None:
                self._pending.drop(key)

    def purge(self, where: Match) -> int:
        if not isinstance(where, Match):
            raise ConfigError(f"`where` must be a Match, got {type(where).__name__}")
        if where.empty:
            raise ConfigError("`where` must set at least one field; use `clear()` to delete everything")
        sql, params = _where_sql(where, live_at=self.clock())
        return self._delete_where("purge", sql, params, scrub=True)  # an erasure: expiry is not

    def expire(self) -> int:
        return self._delete_where("expire", "expires IS NOT NULL AND expires <= ?", [self.clock()])

    def clear(self) -> int:
        now = self.clock()

        def steps(conn: sqlite3.Connection) -> int:
            live = conn.execute("SELECT count(*) FROM records WHERE expires IS NULL OR expires > ?", (now,))
            count = int(live.fetchone()[0])
            conn.execute("DELETE FROM records")
            return count

        with self._write_lock:
            self.flush_hits(raise_errors=False)
            count = int(self._write("clear", steps))
            self._scrub("clear")
            return count

    def _delete_where(self, action: str, where_sql: str, params: list[Any], *, scrub: bool = False) -> int:
        with self._write_lock:
            # Flush first so no pending hit outlives its record and lands on a later record with the same key.
            self.flush_hits(raise_errors=False)
            count = int(
                self._write(
                    action,
                    lambda conn: conn.execute(f"DELETE FROM records WHERE {where_sql}", params).rowcount,
                )
            )
            if scrub:
                self._scrub(action)
            return count

    def _scrub(self, action: str) -> None:
        """Checkpoint the WAL into the file and truncate it, so deleted records leave the files (called
        under the write lock, after the delete committed)."""
        try:
            (busy, _, _) = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            self.stats.add("errors")
            raise _backend_error(action, self.path, exc) from exc
        if busy:
            self.stats.add("errors")
            raise BackendError(
                f"sqlite store {self.path!r}: {action} deleted its records, but a reader still holds an "
                "older snapshot, so the WAL keeps their old pages; run it again once readers finish"
            )

    # -- hit counters ------------------------------------------------------------------------------------

    def _start_flusher(self) -> None:
        """Start the background thread that flushes hits every `hit_flush_interval_s` (locked)."""
        # One daemon thread per store, started on the first hit: a timer per flush would open a new
        # per-thread connection each time. It holds only a weak reference, so an unclosed store can still
        # be collected; a daemon thread never blocks interpreter exit; `close` flushes what is left.
        interval = max(self.settings.hit_flush_interval_s, 0.01)
        self._flusher = threading.Thread(
            target=_flush_loop,
            args=(weakref.ref(self), self._stop, interval),
            name="cachelm-hits",
            daemon=True,
        )
        self._flusher.start()

    def flush_hits(self, *, raise_errors: bool = True) -> int:
        """Write the pending hit counts now; returns how many hits were written."""
        with self._write_lock:
            pending = self._pending.take()
            if not pending:
                return 0
            try:
                self._write(
                    "flush hits",
                    lambda conn: conn.executemany(
                        "UPDATE records SET hits = hits + ? WHERE key = ?",
                        [(n, k) for k, n in pending.items()],
                    ),
                )
            except BackendError:
                self._pending.give_back(pending)  # for the next flush
                if raise_errors:
                    raise
                return 0
            return sum(pending.values())

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join()
        try:
            self.flush_hits(raise_errors=False)
        finally:
            self._closed = True
            with self._connections_lock:
                connections, self._connections = self._connections, []
            for conn in connections:
                conn.close()
            self._local = threading.local()


def _flush_loop(ref: weakref.ref[SQLiteStore], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        store = ref()
        if store is None:
            return
        if store._pending.total:
            try:
                store.flush_hits(raise_errors=False)
            except BackendError:  # closed between the check and the flush
                return
        del store  # do not keep the store alive while waiting


def stored_checksum(key: str, meta_json: str, value: bytes) -> bytes:
    """`Record.checksum` computed from the metadata JSON *as stored*, skipping a re-serialisation.

    Equal to ``record.checksum()`` whenever `meta_json` came from ``record.meta_json()``; any change to the
    stored key, metadata text or value changes it, so it detects the same corruption.
    """
    h = hashlib.sha256()
    for part in (key.encode(), meta_json.encode(), value):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def decode_verified(key: str, value: bytes, meta_json: str, checksum: bytes, hits: int) -> Record | None:
    """Rebuild a stored record, or None when its checksum or metadata is bad (the caller counts it)."""
    try:
        if stored_checksum(key, meta_json, value) != checksum:
            return None
        return record_from_meta(key, value, meta_json, hits)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeEncodeError):
        return None


def _where_sql(where: Match, *, live_at: float | None) -> tuple[str, list[Any]]:
    """SQL condition over `records` for `where` (and, when `live_at` is set, not expired at that time)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column in ("tenant", "user", "model"):
        value = getattr(where, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if where.tag is not None:
        clauses.append("id IN (SELECT rid FROM tags WHERE tag = ?)")
        params.append(where.tag)
    if where.created_before is not None:
        clauses.append("created < ?")
        params.append(where.created_before)
    if live_at is not None:
        clauses.append("(expires IS NULL OR expires > ?)")
        params.append(live_at)
    return (" AND ".join(clauses) or "1"), params
