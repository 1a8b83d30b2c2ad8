"""`open_store(url)`: choose and open a record store from a URL.

- ``memory://`` — in-process dict (`MemoryStore`).
- ``sqlite:///abs/path.db`` or ``sqlite://rel.db`` — SQLite file (`SQLiteStore`); query parameters are its
  settings, e.g. ``?synchronous=FULL&max_size_bytes=1000000``.
- ``redis://host:port/db?namespace=x``, ``rediss://…`` (TLS), ``unix:///path/redis.sock?db=0&namespace=x`` —
  Redis (`RedisStore`); ``socket_timeout`` / ``socket_connect_timeout`` (seconds) may be given in the query.

Keyword arguments go to the store's constructor (``clock=``, settings). ``keyring=`` wraps the store in an
`EncryptedStore`. An unknown scheme or a malformed URL raises ``ConfigError`` naming the URL.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cachelm.errors import ConfigError
from cachelm.store.base import Store
from cachelm.store.memory import MemoryStore

SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix")


def open_store(url: str, **kwargs: Any) -> Store:
    """Open the store `url` names. See the module docstring for the URL forms."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"`url` must look like scheme://..., got {url!r}; known schemes: {SCHEMES}")
    keyring = kwargs.pop("keyring", None)
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        if url.split("://", 1)[1] not in ("", "/"):
            raise ConfigError(f"`url` {url!r}: memory:// takes no path or parameters")
        store: Store = MemoryStore(**kwargs)
    elif scheme == "sqlite":
        store = _open_sqlite(url, kwargs)
    elif scheme in ("redis", "rediss", "unix"):
        from cachelm.store.redis import RedisStore  # redis-py is an optional extra

        store = RedisStore.from_url(url, **kwargs)
    else:
        raise ConfigError(f"`url` {url!r} has unknown scheme {scheme!r}; known schemes: {SCHEMES}")
    if keyring is not None:
        from cachelm.store.encrypted import EncryptedStore

        store = EncryptedStore(store, keyring)
    return store


def sqlite_file(url: str) -> str | None:
    """The database file a ``sqlite://`` store URL names (the semantic index persists beside it); None for
    other schemes. Raises ConfigError when a sqlite URL names no file."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return None
    # sqlite:///abs/path → netloc "" and path "/abs/path"; sqlite://rel.db → netloc "rel.db".
    path = parts.netloc + parts.path
    if path.startswith("//"):  # sqlite:////abs/path (SQLAlchemy's spelling) means the same file
        path = "/" + path.lstrip("/")
    if not path or path == "/":
        raise ConfigError(f"`url` {url!r} names no database file (sqlite:///abs/path.db or sqlite://rel.db)")
    return path


def _open_sqlite(url: str, kwargs: dict[str, Any]) -> Store:
    from cachelm.store.sqlite import SQLiteSettings, SQLiteStore

    path = sqlite_file(url)
    assert path is not None
    parts = urlsplit(url)
    types = {f.name: f.type for f in dataclasses.fields(SQLiteSettings)}
    settings: dict[str, Any] = {}
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        if name not in types:
            raise ConfigError(f"`url` {url!r}: unknown sqlite setting {name!r}; known: {sorted(types)}")
        settings[name] = _coerce(url, name, raw, str(types[name]))
    return SQLiteStore(path, **{**settings, **kwargs})


def _coerce(url: str, name: str, raw: str, type_name: str) -> Any:
    """Parse a query-string value as the settings field's declared type (``int``, ``float``, ``str``…)."""
    if raw.lower() == "none" and "None" in type_name:
        return None
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"`url` {url!r}: setting {name!r} must be a {type_name}, got {raw!r}") from None
    return raw
