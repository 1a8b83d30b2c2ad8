"""`EncryptedStore`: encrypts record values at rest, over any `Store`.

Only ``Record.value`` is encrypted (AES-GCM envelope from `cachelm.crypto`, bound to the record's tenant and
key). The metadata — tenant, user, tags, model, timestamps, hit count — stays in clear text in the inner
store, because purges by tenant/user/tag/model run inside the backend (SQL DELETE, Redis index sets). Do not
put secrets in tags or user ids. Record keys are digests (`cachelm.keys`) and reveal no text.

A record that fails to decrypt (tampered, moved to another key or tenant) reads as a miss: it is deleted
and counted in ``stats.corrupt_reads``, which this wrapper shares with the inner store. A record sealed
under a key id this keyring does not hold also reads as a miss, counted in ``stats.unknown_key_reads``, but
is left in place: in a shared store it is most likely another replica's, written after that replica got a
new master key (a rolling rotation), or this process was given the wrong keyring, and deleting would let
one misconfigured replica empty the store for all the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace

from cachelm.crypto import Keyring, envelope_key_id
from cachelm.errors import BackendError, ConfigError, IntegrityError, UnknownKeyError
from cachelm.store.base import Match, Record, Store


class EncryptedStore(Store):
    """Wraps `inner`; values are sealed with `keyring` on put and opened on get/peek/scan."""

    def __init__(self, inner: Store, keyring: Keyring) -> None:
        if not isinstance(inner, Store):
            raise ConfigError(f"`inner` must be a Store, got {type(inner).__name__}")
        if not isinstance(keyring, Keyring):
            raise ConfigError(f"`keyring` must be a Keyring, got {type(keyring).__name__}")
        super().__init__(clock=inner.clock)
        self.inner = inner
        self.keyring = keyring
        self.stats = inner.stats  # one set of counters: checksum failures below, decryption failures here
        self.url = inner.url

    def _open(self, record: Record | None) -> Record | None:
        if record is None:
            return None
        try:
            plain = self.keyring.decrypt(record.value, tenant_id=record.tenant, record_key=record.key)
        except UnknownKeyError:  # another replica's key, most likely: a miss, not ours to delete
            self.stats.add("unknown_key_reads")
            return None
        except IntegrityError:
            self.stats.add("corrupt_reads")
            with contextlib.suppress(BackendError):  # the next reader retries the delete
                self.inner.delete(record.key)
            return None
        return replace(record, value=plain)

    def _seal(self, record: Record) -> Record:
        sealed = self.keyring.encrypt(record.value, tenant_id=record.tenant, record_key=record.key)
        return replace(record, value=sealed)

    def get(self, key: str) -> Record | None:
        return self._open(self.inner.get(key))

    def add_hits(self, counts: Mapping[str, int]) -> None:
        self.inner.add_hits(counts)  # keys and hit counts are not sealed

    def peek(self, key: str) -> Record | None:
        return self._open(self.inner.peek(key))

    def put(self, record: Record) -> None:
        if not isinstance(record, Record):
            raise ConfigError(f"`record` must be a Record, got {type(record).__name__}")
        self.inner.put(self._seal(record))

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def scan(self, where: Match | None = None) -> Iterator[Record]:
        for record in self.inner.scan(where):
            opened = self._open(record)
            if opened is not None:
                yield opened

    def purge(self, where: Match) -> int:
        return self.inner.purge(where)

    def clear(self) -> int:
        return self.inner.clear()

    def expire(self) -> int:
        return self.inner.expire()

    def __len__(self) -> int:
        return len(self.inner)

    def rotate(self) -> int:
        """Re-encrypt every record not sealed with the keyring's primary key; returns how many.

        Run after adding a new master key, before removing an old one from the keyring. Records sealed
        under a key id this keyring lacks are left as they are (counted in ``stats.unknown_key_reads``).
        """
        rotated = 0
        for record in list(self.inner.scan()):
            try:
                current = envelope_key_id(record.value) == self.keyring.primary
            except IntegrityError:
                current = False
            if current:
                continue
            opened = self._open(record)
            if opened is not None:
                self.inner.put(self._seal(opened))
                rotated += 1
        return rotated

    def close(self) -> None:
        self.inner.close()
