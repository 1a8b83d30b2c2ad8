"""Shared fixtures: real services, GPU skipping, unique namespaces."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.services import RedisServer
from tests.upstream import OpenAIUpstream


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def upstream() -> Iterator[OpenAIUpstream]:
    """A real OpenAI-protocol server on loopback (tests/upstream.py), one per test."""
    server = OpenAIUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a real Redis server (shared by tests; isolate with the `namespace` fixture)."""
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A unique key prefix, so tests sharing one Redis or Postgres never see each other's data."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a real PostgreSQL with pgvector (isolate with the `namespace` fixture, e.g. as a table name)."""
    from tests.services import PostgresServer

    server = PostgresServer()
    yield server.url
    server.close()


@pytest.fixture
def table(pg_url: str, namespace: str) -> Iterator[str]:
    """A pgvector table name of this test's own, dropped afterwards through a fresh connection."""
    yield namespace
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {namespace}")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch CPU thread for a module of tiny-model tests, restored after it (`pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`). Tiny models are dominated by thread start-up and
    contention on a shared 2-core CI machine: one thread is ~30x faster there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
