"""Record stores behind one interface. `open_store(url)` picks a backend from a URL."""

from cachelm.store.base import DEFAULT_TENANT, Match, Record, Store, StoreStats
from cachelm.store.memory import MemoryStore

__all__ = ["DEFAULT_TENANT", "Match", "MemoryStore", "Record", "Store", "StoreStats"]
