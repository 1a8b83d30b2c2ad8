"""The shared record store: a real Redis server (redis-py, synchronous).

Key layout under the namespace ``ns`` (letters, digits, ``_ . -``)::

    ns:r:<key>     hash {v: value, c: checksum, h: hits}; PEXPIREAT at the record's expiry, so Redis itself
                   drops expired values
    ns:m:<key>     the record's metadata JSON (`Record.meta_json`); no expiry: it names the sets to clean
    ns:all         set of every key;  ns:created  zset key → created;  ns:exp  zset key → expiry (ms)
    ns:ix:tenant:<t>, ns:ix:user:<u>, ns:ix:model:<m>, ns:ix:tag:<t>     sets used by `purge`

Every write (put, delete, expiry sweep) is one Lua script, so the record, its metadata and its index entries
change together: a reader never sees a value with another record's metadata, and an index never loses a
live key. A get is one script call (one round trip) that reads the record and increments its hit count.

Expiry: the *server's* clock decides when Redis drops a record (PEXPIREAT of the record's ``expires``), and
the store's ``clock`` (wall time by default) hides a record whose ``expires`` has passed even if the server
still holds it. The metadata and index entries of a record Redis expired are removed by ``expire()``, which
``put`` also runs in small batches every ``sweep_every`` writes. ``len`` may count expired records not yet
swept. Metadata (tenant, user, model, tags) stays clear text even under `EncryptedStore`: purges need it.

Every redis-py error (connection refused, timeout, server error) raises ``BackendError``; connect and read
timeouts are ``socket_connect_timeout`` / ``socket_timeout`` (seconds), and no command is retried, so a dead
server fails fast.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cachelm.clock import Clock, wall_clock
from cachelm.errors import BackendError, ConfigError
from cachelm.store.base import Match, Record, Store, check_key
from cachelm.store.sqlite import decode_verified

_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_BATCH = 256
_MAX_EXPIRY_MS = 2**63 - 1

# Shared Lua: index/unindex a key from the sets its metadata names. pre = namespace.
_LUA_INDEX = """
local function sets(pre, meta)
  local m = cjson.decode(meta)
  local out = {pre .. ':ix:tenant:' .. m['tenant'], pre .. ':ix:user:' .. m['user'],
               pre .. ':ix:model:' .. m['model']}
  for _, tag in ipairs(m['tags']) do out[#out + 1] = pre .. ':ix:tag:' .. tag end
  return out
end
local function unindex(pre, key, meta)
  local ok, names = pcall(sets, pre, meta)
  if ok then for _, s in ipairs(names) do redis.call('SREM', s, key) end end
  redis.call('SREM', pre .. ':all', key)
  redis.call('ZREM', pre .. ':created', key)
  redis.call('ZREM', pre .. ':exp', key)
end
"""

# KEYS: r, m. ARGV: pre, key, value, meta, checksum, hits, expires_ms ('' = never), created (exact repr).
_LUA_PUT = (
    _LUA_INDEX
    + """
local pre, key = ARGV[1], ARGV[2]
local old = redis.call('GET', KEYS[2])
if old then unindex(pre, key, old) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'c', ARGV[5], 'h', ARGV[6])
redis.call('SET', KEYS[2], ARGV[4])
local names = sets(pre, ARGV[4])
for _, s in ipairs(names) do redis.call('SADD', s, key) end
redis.call('SADD', pre .. ':all', key)
-- created comes from ARGV, not the decoded JSON: Lua would round it to 14 digits.
redis.call('ZADD', pre .. ':created', ARGV[8], key)
if ARGV[7] ~= '' then
  redis.call('ZADD', pre .. ':exp', ARGV[7], key)
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
end
return 1
"""
)

_DELETE_BODY = """
local live = redis.call('EXISTS', KEYS[1])
local old = redis.call('GET', KEYS[2])
if old then unindex(ARGV[1], ARGV[2], old) else
  redis.call('SREM', ARGV[1] .. ':all', ARGV[2]); redis.call('ZREM', ARGV[1] .. ':exp', ARGV[2]) end
redis.call('DEL', KEYS[1], KEYS[2])
return live
"""

# KEYS: r, m. ARGV: pre, key. Returns 1 when a record (not yet expired by Redis) existed.
_LUA_DELETE = _LUA_INDEX + _DELETE_BODY

# KEYS: r, m. ARGV: pre, key, then the value, checksum and metadata a reader found corrupt, each as '1'
# followed by the bytes, or '0' when absent. Deletes only while the record is still those bytes: a record
# another writer put since the read is left alone.
_LUA_DELETE_SAME = (
    _LUA_INDEX
    + """
local function same(now, was)
  if string.sub(was, 1, 1) == '0' then return not now end
  return now == string.sub(was, 2)
end
local r = redis.call('HMGET', KEYS[1], 'v', 'c')
if not (same(r[1], ARGV[3]) and same(r[2], ARGV[4]) and same(redis.call('GET', KEYS[2]), ARGV[5])) then
  return 0
end
"""
    + _DELETE_BODY
)

# KEYS: index sets to clean. ARGV: pre, keys... Forgets keys that have neither a value nor metadata; the
# check runs inside the script, so a key re-put since the caller looked is left alone.
_LUA_FORGET = """
local pre = ARGV[1]
for i = 2, #ARGV do
  local key = ARGV[i]
  if redis.call('EXISTS', pre .. ':r:' .. key) == 0 and redis.call('EXISTS', pre .. ':m:' .. key) == 0 then
    for _, s in ipairs(KEYS) do redis.call('SREM', s, key) end
    redis.call('SREM', pre .. ':all', key)
    redis.call('ZREM', pre .. ':created', key)
    redis.call('ZREM', pre .. ':exp', key)
  end
end
return 1
"""

# KEYS: r, m. Returns {value, checksum, hits, meta} and counts a hit, or nil.
_LUA_GET = """
local r = redis.call('HMGET', KEYS[1], 'v', 'c', 'h')
if not r[1] then return false end
redis.call('HINCRBY', KEYS[1], 'h', 1)
return {r[1], r[2], r[3], redis.call('GET', KEYS[2])}
"""

# KEYS: r of each record. ARGV: hits to add to each. A key without a record is skipped (HINCRBY alone
# would create a hash with nothing but a count).
_LUA_ADD_HITS = """
for i, r in ipairs(KEYS) do
  if redis.call('EXISTS', r) == 1 then redis.call('HINCRBY', r, 'h', ARGV[i]) end
end
return 1
"""

# ARGV: pre, now_ms, limit. Unindexes keys whose expiry passed and whose value Redis already dropped.
_LUA_SWEEP = (
    _LUA_INDEX
    + """
local pre = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', pre .. ':exp', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, key in ipairs(due) do
  if redis.call('EXISTS', pre .. ':r:' .. key) == 0 then
    local m = pre .. ':m:' .. key
    local old = redis.call('GET', m)
    if old then unindex(pre, key, old) else redis.call('ZREM', pre .. ':exp', key) end
    redis.call('DEL', m)
    n = n + 1
  end
end
return {n, #due}
"""
)


class RedisStore(Store):
    """Records in a real Redis server under one namespace. See the module docstring for layout and expiry."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "cachelm",
        clock: Clock = wall_clock,
        sweep_every: int = 1000,
        url: str = "",
    ) -> None:
        super().__init__(clock=clock)
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(f"`namespace` must be 1-64 of [A-Za-z0-9_.-], got {namespace!r}")
        if not isinstance(sweep_every, int) or sweep_every < 1:
            raise ConfigError(f"`sweep_every` must be an int >= 1, got {sweep_every!r}")
        self.client = client
        self.namespace = namespace
        self.sweep_every = sweep_every
        self.url = url or f"redis://?namespace={namespace}"
        self._puts = 0
        self._put = client.register_script(_LUA_PUT)
        self._delete = client.register_script(_LUA_DELETE)
        self._delete_same = client.register_script(_LUA_DELETE_SAME)
        self._get = client.register_script(_LUA_GET)
        self._add_hits = client.register_script(_LUA_ADD_HITS)
        self._sweep = client.register_script(_LUA_SWEEP)
        self._forget = client.register_script(_LUA_FORGET)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str | None = None,
        socket_timeout: float = 1.0,
        socket_connect_timeout: float = 1.0,
        clock: Clock = wall_clock,
        sweep_every: int = 1000,
    ) -> RedisStore:
        """Connect to `url` (``redis://``, ``rediss://`` or ``unix://``); ``?namespace=`` sets the prefix.

        Timeouts in the query string (``socket_timeout``, ``socket_connect_timeout``) override the arguments.
        """
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        namespace = query.pop("namespace", None) or namespace or "cachelm"
        timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
        for name in timeouts:
            if name in query:
                try:
                    timeouts[name] = float(query.pop(name))
                except ValueError:
                    raise ConfigError(f"`url` {url!r}: `{name}` must be a number of seconds") from None
        for name, value in timeouts.items():
            if value <= 0:
                raise ConfigError(f"`{name}` must be > 0 seconds, got {value!r}")
        # redis-py reads a path that is not a number ("/cache") as database 0: another database than meant.
        db = parts.path.strip("/") if parts.scheme in ("redis", "rediss") else query.get("db", "")
        if db and not db.isdigit():
            raise ConfigError(f"`url` {url!r}: the database must be a number, got {db!r}")
        # Rebuilt by hand: urlunsplit turns "unix:///path" into "unix:/path", which redis-py rejects.
        base = url.split("?", 1)[0]
        clean = f"{base}?{urlencode(query)}" if query else base
        try:
            client = redis.Redis.from_url(
                clean,
                retry=Retry(NoBackoff(), 0),  # fail fast: the serving path turns this into a miss
                **timeouts,
            )
        except (ValueError, redis.RedisError) as exc:
            raise ConfigError(f"`url` {url!r} is not a valid Redis URL: {exc}") from exc
        shown = base.replace(parts.netloc, parts.netloc.rsplit("@", 1)[-1], 1)  # hide the password
        return cls(client, namespace=namespace, clock=clock, sweep_every=sweep_every, url=shown)

    # -- keys --------------------------------------------------------------------------------------------

    def _r(self, key: str) -> str:
        return f"{self.namespace}:r:{key}"

    def _m(self, key: str) -> str:
        return f"{self.namespace}:m:{key}"

    def _error(self, action: str, exc: redis.RedisError) -> BackendError:
        self.stats.add("errors")
        return BackendError(f"redis store {self.url!r}: {action} failed: {type(exc).__name__}: {exc}")

    # -- reads -------------------------------------------------------------------------------------------

    def _decode(self, key: str, fields: Sequence[Any]) -> Record | None:
        """(value, checksum, hits, meta) → Record; None when any part is missing or fails the checksum."""
        value, checksum, hits, meta = fields
        if value is None or checksum is None or meta is None:
            return None
        try:
            meta_json, hit_count = bytes(meta).decode(), int(hits or 0)
        except (UnicodeDecodeError, ValueError):
            return None
        return decode_verified(key, bytes(value), meta_json, bytes(checksum), hit_count)

    def _corrupt(self, key: str, value: Any, checksum: Any, meta: Any) -> None:
        """Count a record that failed its checks and drop it, unless a writer replaced it since the read."""
        self.stats.add("corrupt_reads")

        def was(part: Any) -> bytes:
            return b"0" if part is None else b"1" + bytes(part)

        # A failure leaves it: the next reader finds it corrupt and retries the delete.
        with contextlib.suppress(redis.RedisError):
            self._delete_same(
                keys=[self._r(key), self._m(key)],
                args=[self.namespace, key, was(value), was(checksum), was(meta)],
            )

    def get(self, key: str) -> Record | None:
        check_key(key)
        try:
            fields = self._get(keys=[self._r(key), self._m(key)])
        except redis.RedisError as exc:
            raise self._error("get", exc) from exc
        if not fields:
            return None
        record = self._decode(key, fields)
        if record is None:
            self._corrupt(key, fields[0], fields[1], fields[3])
            return None
        return None if record.expired(self.clock()) else record

    def add_hits(self, counts: Mapping[str, int]) -> None:
        counts = self.check_hits(counts)
        if not counts:
            return
        try:
            self._add_hits(keys=[self._r(key) for key in counts], args=list(counts.values()))
        except redis.RedisError as exc:
            raise self._error("add hits", exc) from exc

    def peek(self, key: str) -> Record | None:
        check_key(key)
        records = self._read_many([key])
        return records[0] if records else None

    def _read_many(self, keys: Sequence[str], ghosts: list[str] | None = None) -> list[Record]:
        """Live, checksum-valid records among `keys` (one round trip); corrupt ones are counted, deleted.

        Keys with neither a value nor metadata are appended to `ghosts` when it is given.
        """
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self._r(key), "v", "c", "h")
            pipe.get(self._m(key))
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise self._error("read", exc) from exc
        now = self.clock()
        out: list[Record] = []
        for i, key in enumerate(keys):
            (value, checksum, hits), meta = replies[2 * i], replies[2 * i + 1]
            if value is None:  # gone: expired by Redis, or deleted since it was listed
                if meta is None and ghosts is not None:
                    ghosts.append(key)
                continue
            record = self._decode(key, (value, checksum, hits, meta))
            if record is None:
                self._corrupt(key, value, checksum, meta)
            elif not record.expired(now):
                out.append(record)
        return out

    def _index_sets(self, where: Match) -> list[str]:
        sets = [
            f"{self.namespace}:ix:{name}:{value}"
            for name, value in (("tenant", where.tenant), ("user", where.user), ("model", where.model))
            if value is not None
        ]
        if where.tag is not None:
            sets.append(f"{self.namespace}:ix:tag:{where.tag}")
        return sets

    def _candidates(self, where: Match) -> Iterator[str]:
        """Keys that may match `where`, from the index sets (an over-approximation filtered by the caller)."""
        sets = self._index_sets(where)
        try:
            if sets:
                members: Iterable[Any] = self.client.sinter(sets)
            elif where.created_before is not None:
                members = self.client.zrangebyscore(
                    f"{self.namespace}:created", "-inf", f"({where.created_before!r}"
                )
            else:
                members = self.client.sscan_iter(f"{self.namespace}:all", count=_BATCH)
            for member in members:
                yield member.decode()
        except redis.RedisError as exc:
            raise self._error("scan", exc) from exc

    def scan(self, where: Match | None = None) -> Iterator[Record]:
        where = where or Match()
        batch: list[str] = []
        for key in self._candidates(where):
            batch.append(key)
            if len(batch) >= _BATCH:
                yield from self._scan_batch(batch, where)
                batch = []
        if batch:
            yield from self._scan_batch(batch, where)

    def _scan_batch(self, keys: list[str], where: Match) -> list[Record]:
        ghosts: list[str] = []
        records = [r for r in self._read_many(keys, ghosts) if where.matches(r)]
        if ghosts:
            # Index entries of keys with no value and no metadata (left by a record whose metadata was
            # corrupt when it was deleted): drop them from the sets we read, if the key is still absent.
            try:
                self._forget(keys=self._index_sets(where), args=[self.namespace, *ghosts])
            except redis.RedisError as exc:
                raise self._error("scan", exc) from exc
        return records

    def __len__(self) -> int:
        try:
            return int(self.client.scard(f"{self.namespace}:all"))
        except redis.RedisError as exc:
            raise self._error("count", exc) from exc

    # -- writes ------------------------------------------------------------------------------------------

    def put(self, record: Record) -> None:
        if not isinstance(record, Record):
            raise ConfigError(f"`record` must be a Record, got {type(record).__name__}")
        # PEXPIREAT takes a signed 64-bit count of ms; a later expiry fails it halfway through the script
        # (after the value is written, before it is indexed), so it is capped: ~292 million years.
        expires_ms = "" if record.expires is None else str(min(round(record.expires * 1000), _MAX_EXPIRY_MS))
        args: list[str | bytes | int] = [
            self.namespace,
            record.key,
            record.value,
            record.meta_json(),
            record.checksum(),
            record.hits,
            expires_ms,
            repr(record.created),
        ]
        try:
            self._put(keys=[self._r(record.key), self._m(record.key)], args=args)
        except redis.RedisError as exc:
            raise self._error("put", exc) from exc
        self._puts += 1
        if self._puts % self.sweep_every == 0:
            self._sweep_once(limit=_BATCH)

    def delete(self, key: str) -> bool:
        check_key(key)
        try:
            return bool(self._delete(keys=[self._r(key), self._m(key)], args=[self.namespace, key]))
        except redis.RedisError as exc:
            raise self._error("delete", exc) from exc

    def _delete_many(self, keys: Iterable[str]) -> int:
        deleted = 0
        keys = list(keys)
        for start in range(0, len(keys), _BATCH):
            pipe = self.client.pipeline(transaction=False)
            for key in keys[start : start + _BATCH]:
                self._delete(keys=[self._r(key), self._m(key)], args=[self.namespace, key], client=pipe)
            try:
                deleted += sum(int(n) for n in pipe.execute())
            except redis.RedisError as exc:
                raise self._error("delete", exc) from exc
        return deleted

    def _sweep_once(self, *, limit: int) -> tuple[int, int]:
        now_ms = round(self.clock() * 1000)
        try:
            cleaned, seen = self._sweep(args=[self.namespace, now_ms, limit])
        except redis.RedisError as exc:
            raise self._error("expire", exc) from exc
        return int(cleaned), int(seen)

    def expire(self) -> int:
        """Remove the metadata and index entries of records whose expiry passed; returns how many.

        Records whose expiry passed by the store's clock but not yet by the server's are deleted too.
        """
        total = 0
        while True:
            cleaned, seen = self._sweep_once(limit=_BATCH)
            total += cleaned
            if seen < _BATCH or cleaned == 0:
                break
        # The server may still hold records the store's clock says are expired (clock skew): delete them.
        now_ms = round(self.clock() * 1000)
        try:
            members: list[Any] = self.client.zrangebyscore(f"{self.namespace}:exp", "-inf", now_ms)
            due = [bytes(k).decode() for k in members]
        except redis.RedisError as exc:
            raise self._error("expire", exc) from exc
        self._delete_many(due)
        return total + len(due)

    def clear(self) -> int:
        """Delete every key of the namespace (records, metadata, indexes); returns live records deleted."""
        live = sum(1 for _ in self.scan())
        try:
            # The namespace holds no ':' or glob characters, so this pattern matches only its own keys.
            batch: list[bytes] = []
            for name in self.client.scan_iter(match=f"{self.namespace}:*", count=_BATCH):
                batch.append(name)
                if len(batch) >= _BATCH:
                    self.client.unlink(*batch)
                    batch = []
            if batch:
                self.client.unlink(*batch)
        except redis.RedisError as exc:
            raise self._error("clear", exc) from exc
        return live

    def close(self) -> None:
        self.client.close()
