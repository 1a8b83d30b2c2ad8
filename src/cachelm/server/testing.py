"""Run a real proxy for tests and benchmarks: in a background thread, or as a separate process.

Both serve over real TCP on 127.0.0.1; nothing is mocked. `ProxyThread` shares the test's process (fast to
start, direct access to the runtime's counters); `ProxyProcess` is a separate ``cachelm serve`` process
(for replicas, SIGKILL, and measuring without the client's interpreter in the way).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import httpx
import uvicorn

from cachelm.server.app import build_app
from cachelm.server.config import ServerConfig
from cachelm.server.runtime import Runtime
from cachelm.server.tenants import TenantRegistry
from cachelm.server.upstream import Upstream


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``/healthz`` until it answers (any status), or raise RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"proxy process exited with {process.returncode}")
        try:
            httpx.get(url + "/healthz", timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy at {url} did not become healthy in {timeout} s")


class ProxyThread:
    """A proxy served by uvicorn in a daemon thread of this process. ``url`` has no ``/v1`` suffix."""

    def __init__(
        self,
        config: ServerConfig,
        registry: TenantRegistry | None = None,
        *,
        upstream: Upstream | None = None,
    ) -> None:
        self.runtime = Runtime(config, registry or TenantRegistry(), upstream=upstream)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                build_app(self.runtime),
                host="127.0.0.1",
                port=self.port,
                log_level="critical",
                access_log=False,
                lifespan="on",
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="cachelm-proxy", daemon=True)

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> ProxyThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyProcess:
    """``python -m cachelm.server.cli`` in its own process, with `args` and extra `env`."""

    def __init__(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, log_path: str | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> str:
        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cachelm.server.cli", *self.args], env=self.env, stdout=log, stderr=log
        )
        log.close()
        wait_healthy(self.url, timeout, self.process)
        return self.url

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
