"""The record store interface every backend implements (memory, SQLite, Redis, PostgreSQL).

A store maps a key (a hex digest from `cachelm.keys`) to a `Record`: an opaque value plus the metadata that
invalidation needs (tenant, user, tags, model, timestamps). Contract, tested once for every backend in
``tests/contract/test_store_contract.py``:

- ``get`` of a missing, expired or corrupt record returns ``None`` (a miss), never raises for those cases;
  a corrupt record also increments ``stats.corrupt_reads`` and is deleted.
- ``get`` increments the record's hit count (``Record.hits``) and returns the record as stored before the hit.
- ``put`` replaces any record under the same key, atomically: a reader sees the old or the new record.
- ``purge(Match(...))`` deletes every record that matches all given fields and returns how many it deleted.
- A backend failure (server down, timeout, disk full) raises ``BackendError``; callers on the serving path
  turn it into a miss.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import orjson

from cachelm.clock import Clock, wall_clock
from cachelm.errors import ConfigError, check_text

DEFAULT_TENANT = "default"


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """One cached value and its metadata. `value` is opaque bytes (possibly encrypted)."""

    key: str
    value: bytes
    tenant: str = DEFAULT_TENANT
    user: str = ""
    tags: frozenset[str] = frozenset()
    model: str = ""
    created: float = 0.0  # wall-clock seconds
    expires: float | None = None  # wall-clock seconds; None never expires
    hits: int = 0

    def __post_init__(self) -> None:
        check_key(self.key)
        if not isinstance(self.value, bytes):
            raise ConfigError(f"`value` must be bytes, got {type(self.value).__name__}")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ConfigError(f"`tenant` must be a non-empty string, got {self.tenant!r}")
        if not isinstance(self.tags, frozenset):
            object.__setattr__(self, "tags", frozenset(self.tags))
        # Every backend stores these as UTF-8 (SQLite TEXT, Redis index names): a lone surrogate has no
        # UTF-8 form, and reaching a backend it failed there after a partial write (Redis) or raw.
        for name, text in (("tenant", self.tenant), ("user", self.user), ("model", self.model)):
            check_text(name, text)
        for tag in self.tags:
            check_text("tags[]", tag)
        # Infinity or NaN would be written as metadata JSON no reader parses (the record then reads as
        # corrupt) and cannot be a Redis expiry; "never expires" is `expires=None`.
        for name, when in (("created", self.created), ("expires", self.expires)):
            if when is not None and (
                isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when)
            ):
                raise ConfigError(f"`{name}` must be a finite number of seconds, got {when!r}")
        if self.expires is not None and self.expires < self.created:
            raise ConfigError(f"`expires` ({self.expires}) is before `created` ({self.created})")

    @property
    def size(self) -> int:
        """Bytes of the value (metadata not counted)."""
        return len(self.value)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def with_hits(self, hits: int) -> Record:
        return replace(self, hits=hits)

    def meta_json(self) -> str:
        """The metadata (everything but key, value and hits) as canonical JSON; backends persist it."""
        return json.dumps(
            {
                "tenant": self.tenant,
                "user": self.user,
                "tags": sorted(self.tags),
                "model": self.model,
                "created": self.created,
                "expires": self.expires,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def checksum(self) -> bytes:
        """SHA-256 over key, metadata and value; a reader that recomputes a different one saw corruption."""
        h = hashlib.sha256()
        for part in (self.key.encode(), self.meta_json().encode(), self.value):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()


def record_from_meta(key: str, value: bytes, meta_json: str, hits: int = 0) -> Record:
    """Rebuild a record from what `Record.meta_json` wrote. Raises ValueError/KeyError on malformed input."""
    meta = orjson.loads(meta_json)  # on every read: orjson is ~4x faster than json here
    return Record(
        key=key,
        value=value,
        tenant=meta["tenant"],
        user=meta["user"],
        tags=frozenset(meta["tags"]),
        model=meta["model"],
        created=float(meta["created"]),
        expires=None if meta["expires"] is None else float(meta["expires"]),
        hits=hits,
    )


def check_ttl(ttl: float | None, name: str = "ttl") -> None:
    """Raise ConfigError unless `ttl` is None (never expires) or a finite number of seconds > 0."""
    # Finite: an infinite TTL makes an infinite expiry, which no store can hold (None means "never").
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf
    ):
        raise ConfigError(f"`{name}` must be a finite number of seconds > 0 or None, got {ttl!r}")


def check_key(key: object) -> None:
    """Raise ConfigError unless `key` is a non-empty string with a UTF-8 form (what `Record.key` accepts)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"`key` must be a non-empty string, got {key!r}")
    check_text("key", key)


class Generations:
    """Change counters for keys, for a reader that works outside its owner's lock: it takes `of(key)`
    before its unlocked read and compares again under the lock; a different value means a change to that
    key (or to all keys) landed meanwhile, so what it read may be stale. Keys share 256 striped counters
    (a change to one key rarely invalidates another's read). Callers bump under their own lock."""

    _STRIPES = 256

    def __init__(self) -> None:
        self._keys = [0] * self._STRIPES
        self._all = 0

    def of(self, key: str) -> tuple[int, int]:
        return self._all, self._keys[hash(key) % self._STRIPES]

    def bump(self, *keys: str) -> None:
        """Mark each of `keys` changed."""
        for key in keys:
            self._keys[hash(key) % self._STRIPES] += 1

    def bump_all(self) -> None:
        """Mark every key changed (purge, clear, expire)."""
        self._all += 1


class PendingHits:
    """Hit counts held in memory until a batch adds them to stored records (the SQLite store's own hits,
    `TieredStore`'s L1 hits): a hit then costs no write. Thread-safe; `total` is what a batch would add."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.total = 0

    def add(self, key: str, n: int = 1) -> int:
        """Count `n` more hits of `key`; returns the hits it had pending before."""
        with self._lock:
            before = self._counts.get(key, 0)
            self._counts[key] = before + n
            self.total += n
        return before

    def of(self, key: str) -> int:
        return self._counts.get(key, 0)

    def drop(self, key: str | None = None) -> None:
        """Forget the hits of `key` (of every key when None): they belong to a record replaced or deleted."""
        with self._lock:
            if key is None:
                self._counts, self.total = {}, 0
            else:
                self.total -= self._counts.pop(key, 0)

    def take(self) -> dict[str, int]:
        """Everything pending, now no longer pending (the caller writes it)."""
        with self._lock:
            taken, self._counts, self.total = self._counts, {}, 0
        return taken

    def give_back(self, counts: Mapping[str, int]) -> None:
        """Pend `counts` again (a batch that failed to write them)."""
        for key, n in counts.items():
            self.add(key, n)


@dataclass(frozen=True, kw_only=True, slots=True)
class Match:
    """A filter over record metadata; unset fields match anything. All set fields must match."""

    tenant: str | None = None
    user: str | None = None
    tag: str | None = None
    model: str | None = None
    created_before: float | None = None  # wall-clock seconds: "older than"

    def matches(self, record: Record) -> bool:
        return (
            (self.tenant is None or record.tenant == self.tenant)
            and (self.user is None or record.user == self.user)
            and (self.tag is None or self.tag in record.tags)
            and (self.model is None or record.model == self.model)
            and (self.created_before is None or record.created < self.created_before)
        )

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.tenant, self.user, self.tag, self.model, self.created_before))


@dataclass(kw_only=True)
class StoreStats:
    """Counters a store keeps about itself (process-local)."""

    corrupt_reads: int = 0
    unknown_key_reads: int = 0  # `EncryptedStore`: sealed under a key id its keyring lacks (left in place)
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


class Store(ABC):
    """A key → `Record` store. See the module docstring for the contract."""

    url: str = ""

    def __init__(self, *, clock: Clock = wall_clock) -> None:
        self.clock = clock
        self.stats = StoreStats()

    @abstractmethod
    def get(self, key: str) -> Record | None:
        """The live record under `key`, or None (missing, expired or corrupt). Counts a hit."""

    @abstractmethod
    def put(self, record: Record) -> None:
        """Store `record`, replacing any record under its key."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the record under `key`; True if one existed."""

    @abstractmethod
    def scan(self, where: Match | None = None) -> Iterator[Record]:
        """Every live record matching `where` (all records when None), in no particular order."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of records stored (expired records not yet collected may be counted)."""

    def peek(self, key: str) -> Record | None:
        """Like `get`, without counting a hit. Backends may override with a cheaper read."""
        for record in self.scan():
            if record.key == key:
                return record
        return None

    @staticmethod
    def check_hits(counts: Mapping[str, int]) -> dict[str, int]:
        """`counts` validated for `add_hits`: keys as `check_key` wants them, counts ints >= 1."""
        if not isinstance(counts, Mapping):
            raise ConfigError(f"`counts` must be a mapping of key → hits, got {type(counts).__name__}")
        for key, n in counts.items():
            check_key(key)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"hits to add must be ints >= 1, got {n!r} for {key!r}")
        return dict(counts)

    def add_hits(self, counts: Mapping[str, int]) -> None:
        """Add ``counts[key]`` to the hit count of each record that exists (missing keys are skipped):
        the hits a cache in front of this store served for it (`TieredStore`'s L1). Atomic per key
        against concurrent `put`s; backends must override it (a read-modify-write could replace a record
        another writer just put)."""
        raise NotImplementedError(f"{type(self).__name__} cannot add hits")

    def purge(self, where: Match) -> int:
        """Delete every record matching `where`; returns how many were deleted."""
        if where.empty:
            raise ConfigError("`where` must set at least one field; use `clear()` to delete everything")
        return self._delete_many(r.key for r in list(self.scan(where)))

    def clear(self) -> int:
        """Delete every record, expired ones included; returns how many live records were deleted."""
        now = self.clock()
        records = list(self._scan_all())
        self._delete_many(r.key for r in records)
        return sum(1 for r in records if not r.expired(now))

    def expire(self) -> int:
        """Delete every expired record now (stores also drop them lazily on read)."""
        now = self.clock()
        return self._delete_many(r.key for r in list(self._scan_all()) if r.expired(now))

    def _scan_all(self) -> Iterator[Record]:
        """Every record including expired ones; backends override when `scan` hides them."""
        return self.scan()

    def _delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for key in keys if self.delete(key))

    def close(self) -> None:  # noqa: B027 - optional hook, most backends need it
        """Release connections and files. The store must not be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
