"""At-rest envelope encryption: AES-256-GCM with per-tenant keys derived from rotating master keys.

A `Keyring` holds one or more master keys, each under a short key id. The newest (the last one given, or
``primary=``) encrypts; any of them decrypts, chosen by the key id written in the envelope, so keys rotate
without re-encrypting old records first.

Per-tenant data keys::

    data_key = HKDF-SHA256(master, length=32, salt=b"cachelm/v1/" + key_id, info=b"tenant:" + tenant_id)

Envelope (bytes)::

    b"CLE1" | len(key_id) (1 byte) | key_id | nonce (12 random bytes) | ciphertext + GCM tag (16 bytes)

Associated data binds the envelope to its place: (format, key id, tenant, record key). An envelope copied
to another record key or tenant fails authentication, as does any flipped bit. A random 96-bit nonce per
envelope is safe for about 2**32 encryptions per data key (NIST SP 800-38D); rotate the master key sooner.

Failures to decrypt (unknown key id, wrong key, tampering, truncation) raise ``IntegrityError``; an unknown
key id raises its subclass ``UnknownKeyError``.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cachelm.errors import ConfigError, IntegrityError, UnknownKeyError

MAGIC = b"CLE1"
NONCE_BYTES = 12
TAG_BYTES = 16
MIN_MASTER_KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_CACHED_DATA_KEYS = 4096


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"`key_id` must be 1-64 of [A-Za-z0-9_.-], got {key_id!r}")


def derive_key(master_key: bytes, *, key_id: str, tenant_id: str) -> bytes:
    """The 32-byte AES key of `tenant_id` under master key `key_id` (HKDF-SHA256)."""
    _check_key_id(key_id)
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ConfigError(f"`tenant_id` must be a non-empty string, got {tenant_id!r}")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"cachelm/v1/" + key_id.encode(),
        info=b"tenant:" + tenant_id.encode(),
    )
    return hkdf.derive(master_key)


def _associated_data(key_id: str, tenant_id: str, record_key: str) -> bytes:
    parts = (MAGIC, key_id.encode(), tenant_id.encode(), record_key.encode())
    # Length-prefixed, so ("ab", "c") and ("a", "bc") never give the same associated data.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


class Keyring:
    """Master keys by key id. Encrypts with `primary`; decrypts with whichever key the envelope names.

    Data keys and AES-GCM objects are cached per (key id, tenant), bounded to a few thousand entries.
    """

    def __init__(self, keys: Mapping[str, bytes], *, primary: str | None = None) -> None:
        if not isinstance(keys, Mapping) or not keys:
            raise ConfigError(f"`keys` must be a non-empty mapping of key id → bytes, got {keys!r}")
        for key_id, master in keys.items():
            _check_key_id(key_id)
            if not isinstance(master, bytes) or len(master) < MIN_MASTER_KEY_BYTES:
                size = len(master) if isinstance(master, bytes) else "?"
                raise ConfigError(
                    f"master key `{key_id}` must be bytes of length >= {MIN_MASTER_KEY_BYTES}, "
                    f"got {type(master).__name__} of length {size}"
                )
        self._keys = dict(keys)
        self.primary = list(self._keys)[-1] if primary is None else primary
        if self.primary not in self._keys:
            raise ConfigError(f"`primary` must be one of {sorted(self._keys)}, got {primary!r}")
        self._aead: dict[tuple[str, str], AESGCM] = {}
        self._lock = threading.Lock()

    @classmethod
    def generate(cls, key_id: str = "k1") -> Keyring:
        """A keyring with one fresh random 32-byte master key (tests, demos)."""
        return cls({key_id: os.urandom(32)})

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse ``"id1:base64key1,id2:base64key2"`` (oldest first; the last one encrypts).

        The form used by configuration and environment variables (read at the entry points).
        """
        keys: dict[str, bytes] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key_id, sep, encoded = item.partition(":")
            if not sep:
                raise ConfigError(f"keyring entry must be `id:base64key`, got {key_id[:8]!r}…")
            try:
                keys[key_id] = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ConfigError(f"keyring entry `{key_id}` is not valid base64") from None
        return cls(keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def _cipher(self, key_id: str, tenant_id: str) -> AESGCM:
        with self._lock:
            aead = self._aead.get((key_id, tenant_id))
        if aead is None:
            master = self._keys.get(key_id)
            if master is None:
                raise UnknownKeyError(f"unknown key id {key_id!r}; this keyring holds {sorted(self._keys)}")
            aead = AESGCM(derive_key(master, key_id=key_id, tenant_id=tenant_id))
            with self._lock:
                if len(self._aead) >= _MAX_CACHED_DATA_KEYS:
                    self._aead.clear()  # crude but bounded; re-deriving costs microseconds
                self._aead[(key_id, tenant_id)] = aead
        return aead

    def encrypt(self, plaintext: bytes, *, tenant_id: str, record_key: str) -> bytes:
        """Seal `plaintext` for (`tenant_id`, `record_key`) under the primary key; returns the envelope."""
        if not isinstance(plaintext, bytes):
            raise ConfigError(f"`plaintext` must be bytes, got {type(plaintext).__name__}")
        key_id = self.primary
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._cipher(key_id, tenant_id).encrypt(
            nonce, plaintext, _associated_data(key_id, tenant_id, record_key)
        )
        kid = key_id.encode()
        return MAGIC + bytes([len(kid)]) + kid + nonce + sealed

    def decrypt(self, envelope: bytes | bytearray, *, tenant_id: str, record_key: str) -> bytes:
        """Open an envelope sealed for (`tenant_id`, `record_key`). Raises IntegrityError on any failure."""
        return bytes(self._open(envelope, tenant_id, record_key, into_buffer=False))  # bytes: no copy

    def decrypt_to_buffer(self, envelope: bytes | bytearray, *, tenant_id: str, record_key: str) -> bytearray:
        """`decrypt` into a new bytearray, for large values (KV blocks): the plaintext is written once,
        straight into the buffer returned, and the ciphertext is read in place, never copied."""
        plain = self._open(envelope, tenant_id, record_key, into_buffer=True)
        assert isinstance(plain, bytearray)  # narrows the type; `bytearray(plain)` would copy it
        return plain

    def _open(
        self, envelope: bytes | bytearray, tenant_id: str, record_key: str, *, into_buffer: bool
    ) -> bytes | bytearray:
        key_id = envelope_key_id(envelope)
        start = len(MAGIC) + 1 + len(key_id)
        view = memoryview(envelope)
        nonce, sealed = bytes(view[start : start + NONCE_BYTES]), view[start + NONCE_BYTES :]
        if len(sealed) < TAG_BYTES:
            raise IntegrityError("envelope is truncated")
        aead, associated = self._cipher(key_id, tenant_id), _associated_data(key_id, tenant_id, record_key)
        try:
            if not into_buffer:
                return aead.decrypt(nonce, sealed, associated)
            plain = bytearray(len(sealed) - TAG_BYTES)
            aead.decrypt_into(nonce, sealed, associated, plain)
            return plain
        except InvalidTag:
            raise IntegrityError(
                f"envelope failed authentication (key id {key_id!r}): tampered, or sealed for another "
                "tenant or record key"
            ) from None


def envelope_key_id(envelope: bytes | bytearray) -> str:
    """The key id an envelope was sealed with. Raises IntegrityError when it is not an envelope."""
    if (
        not isinstance(envelope, bytes | bytearray)
        or not envelope.startswith(MAGIC)
        or len(envelope) < len(MAGIC) + 1
    ):
        raise IntegrityError("not a cachelm envelope (bad magic)")
    n = envelope[len(MAGIC)]
    raw = envelope[len(MAGIC) + 1 : len(MAGIC) + 1 + n]
    try:
        key_id = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("envelope key id is not ASCII") from None
    if len(raw) != n or not _KEY_ID.fullmatch(key_id):
        raise IntegrityError(f"envelope key id {raw!r} is malformed")
    return key_id
