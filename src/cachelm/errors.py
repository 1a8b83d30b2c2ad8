"""The exceptions cachelm raises.

Every error derives from one root, so ``except CacheLMError`` catches them all::

    CacheLMError
     ├── ConfigError        bad argument or setting (also a ValueError)
     ├── BackendError       a store, index or tier failed (server down, timeout, disk full)
     ├── IntegrityError     a stored record failed its checksum or could not be decrypted
     │    └── UnknownKeyError  sealed under a key id this keyring does not hold (another's; not corrupt)
     ├── TenantError        unknown tenant, bad API key, or an access across tenants
     ├── CheckpointError    a model or fuser checkpoint does not match what it is loaded into
     └── TrainingError      a training run became numerically unsound (non-finite losses or gradients)

Backend libraries' own exceptions (``redis.ConnectionError``, ``sqlite3.OperationalError``…) are translated
into ``BackendError`` at one boundary: the backend module that called them. On the serving path a
``BackendError`` becomes a miss plus a counter, never a failed request.
"""

from __future__ import annotations


class CacheLMError(Exception):
    """Root of every cachelm exception."""


class ConfigError(CacheLMError, ValueError):
    """An argument or setting is invalid; the message names it in backticks and shows the bad value."""


def check_text(name: str, text: object) -> None:
    """Raise ConfigError unless `text` is a str that UTF-8 can encode (no lone surrogates): every store
    writes text as UTF-8, and hashes and tokenizers need its bytes. Here, beside the error, so modules
    that must not load the serving stack (the GPU training host) can use it."""
    if not isinstance(text, str):
        raise ConfigError(f"`{name}` must be a string, got {text!r}")
    if not text.isascii():  # the common case costs one scan, no copy
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"`{name}` must be valid Unicode (no lone surrogates), got {text!r}") from None


class BackendError(CacheLMError):
    """A backend (store, vector index, KV tier, upstream) failed to answer."""


class IntegrityError(CacheLMError):
    """A stored record is corrupt: checksum mismatch, truncated payload, or failed decryption."""


class UnknownKeyError(IntegrityError):
    """An envelope sealed under a key id the keyring lacks: most likely another replica's, sealed after it
    got a new master key, so callers leave it in place rather than delete it as corrupt."""


class TenantError(CacheLMError):
    """A request names an unknown tenant, presents a bad key, or reaches across tenants."""


class CheckpointError(CacheLMError):
    """A checkpoint does not belong to the models or configuration it is loaded into."""


class TrainingError(CacheLMError):
    """A training run went numerically wrong: too many steps with a non-finite loss or gradient."""
