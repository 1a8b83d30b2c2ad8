"""Record stores behind one interface. `open_store(url)` picks a backend from a URL.

`RedisStore` is imported lazily (``cachelm.store.redis``): redis-py is an optional extra.
"""

from cachelm.store.base import DEFAULT_TENANT, Match, Record, Store, StoreStats
from cachelm.store.encrypted import EncryptedStore
from cachelm.store.memory import MemoryStore
from cachelm.store.sqlite import SQLiteSettings, SQLiteStore
from cachelm.store.url import open_store

__all__ = [
    "DEFAULT_TENANT",
    "EncryptedStore",
    "Match",
    "MemoryStore",
    "Record",
    "SQLiteSettings",
    "SQLiteStore",
    "Store",
    "StoreStats",
    "open_store",
]
