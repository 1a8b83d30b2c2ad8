"""Model revisions behind the proxy: ``--model-revision``, ``POST /admin/refresh``, and shared mode.

Everything is real: the proxy over TCP, the openai SDK, the OpenAI-protocol upstream (tests/upstream.py),
SQLite and Redis. The upstream answers deterministically, so "answered by the new revision" is observed as
an upstream call: a request whose answer was refreshed hits without one, any other request misses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cachelm.errors import ConfigError
from cachelm.server.cli import config_from, parser
from cachelm.server.config import ServerConfig
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.server.testing import ProxyThread
from tests.upstream import OpenAIUpstream

ADMIN = "admin-secret-key-0123"
HEADERS = {"authorization": f"Bearer {ADMIN}"}
MODEL = "gpt-4o-mini"
CHAT = "/v1/chat/completions"
QUESTIONS = [
    "What is the capital city of France?",
    "How do I bake sourdough bread at home?",
    "Which planet is the largest one?",
]


def registry() -> TenantRegistry:
    return TenantRegistry.from_config({"admin_keys": [hash_key(ADMIN)]})


def ask(proxy: ProxyThread, text: str) -> str:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, timeout=20)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, messages=[{"role": "user", "content": text}]
    )
    return str(raw.headers["x-cachelm-cache"])


def upstream_calls_metric(proxy: ProxyThread) -> int:
    text = httpx.get(proxy.url + "/metrics").text
    line = next(
        x for x in text.splitlines() if x.startswith('cachelm_server_upstream_calls_total{endpoint="chat')
    )
    return int(float(line.rsplit(" ", 1)[1]))


def finished(proxy: ProxyThread, timeout: float = 20.0) -> dict[str, Any]:
    """The refresh job's final progress, polled over the admin API."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = httpx.get(proxy.url + "/admin/refresh", headers=HEADERS).json()
        if report["refresh"]["state"] not in ("planned", "running"):
            return dict(report["refresh"])
        time.sleep(0.02)
    raise AssertionError("the refresh job did not finish")


def test_refresh_switches_the_revision_and_recomputes_the_most_served_answer(
    upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", semantic=True,
        semantic_embedder="hashing", semantic_threshold=0.8, access_log=False,
        model_revisions=((MODEL, "r1"),),
    )  # fmt: skip
    with ProxyThread(config, registry()) as proxy:
        for text in QUESTIONS:
            assert ask(proxy, text) == "miss"
        for _ in range(3):  # the first question is the most valuable: served three times
            assert ask(proxy, QUESTIONS[0]) == "hit"
        assert ask(proxy, "which planet is the largest one") == "semantic-hit"
        calls = upstream.count(CHAT)

        started = httpx.post(
            proxy.url + "/admin/refresh",
            json={"model": MODEL, "revision": "r2", "budget": 1},
            headers=HEADERS,
        )
        assert started.status_code == 202, started.text
        assert started.json()["revisions"] == {MODEL: "r2"}
        final = finished(proxy)
        assert (final["state"], final["old_entries"], final["refreshed"], final["dropped"]) == (
            "done",
            3,
            1,
            2,
        )
        assert upstream.count(CHAT) == calls + 1  # the job's one recomputation
        assert upstream_calls_metric(proxy) == calls + 1  # ...counted like any upstream call

        assert ask(proxy, QUESTIONS[0]) == "hit"  # refreshed under the new key: no upstream call
        assert upstream.count(CHAT) == calls + 1
        # Dropped answers are gone, exactly and semantically: the new revision answers (and is cached).
        assert ask(proxy, "which planet is the largest one") == "miss"
        assert ask(proxy, QUESTIONS[1]) == "miss"
        assert upstream.count(CHAT) == calls + 3
        assert ask(proxy, QUESTIONS[1]) == "hit"


def test_refresh_failures_cache_nothing_and_bad_requests_change_nothing(
    upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False
    )
    with ProxyThread(config, registry()) as proxy:
        assert ask(proxy, QUESTIONS[0]) == "miss"
        url = proxy.url + "/admin/refresh"
        assert httpx.post(url, json={"model": MODEL, "revision": "r2", "budget": 1}).status_code == 403
        for body, field in (
            ({"revision": "r2", "budget": 1}, "`model`"),
            ({"model": MODEL, "revision": 2, "budget": 1}, "`revision`"),
            ({"model": MODEL, "revision": "r2"}, "exactly one"),
            ({"model": MODEL, "revision": "r2", "budget": 1, "budget_usd": 1.0}, "exactly one"),
            ({"model": MODEL, "revision": "r2", "budget": -1}, "`budget`"),
            ({"model": MODEL, "revision": "r2", "budget": True}, "`budget`"),
            ({"model": MODEL, "revision": "r2", "budget_usd": "1"}, "`budget_usd`"),
            ({"model": MODEL, "revision": "r2", "budget": 1, "tenant": ""}, "`tenant`"),
            ({"model": MODEL, "revision": "r2", "budget": 1, "purge": True}, "unknown"),
        ):
            refused = httpx.post(url, json=body, headers=HEADERS)
            assert refused.status_code == 400 and field in refused.json()["error"]["message"], body
        assert httpx.get(url, headers=HEADERS).json() == {"refresh": None, "revisions": {}}
        assert ask(proxy, QUESTIONS[0]) == "hit"  # nothing switched, nothing removed

        upstream.inject("status=503")
        started = httpx.post(url, json={"model": MODEL, "revision": "r2", "budget": 1}, headers=HEADERS)
        assert started.status_code == 202
        final = finished(proxy)
        assert (final["refreshed"], final["failed"]) == (0, 1) and "503" in final["errors"][0]
        assert ask(proxy, QUESTIONS[0]) == "miss"  # the error was not cached; the new revision answers


def test_a_second_refresh_while_one_runs_is_refused(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False
    )
    with ProxyThread(config, registry()) as proxy:
        for text in QUESTIONS:
            ask(proxy, text)
        upstream.inject("delay=0.5", times=3)
        url = proxy.url + "/admin/refresh"
        first = httpx.post(url, json={"model": MODEL, "revision": "r2", "budget": 3}, headers=HEADERS)
        assert first.status_code == 202
        second = httpx.post(url, json={"model": MODEL, "revision": "r3", "budget": 3}, headers=HEADERS)
        assert second.status_code == 409 and "still running" in second.json()["error"]["message"]
        assert finished(proxy)["refreshed"] == 3
        assert httpx.get(url, headers=HEADERS).json()["revisions"] == {MODEL: "r2"}


def test_replicas_follow_a_switch_and_a_restarted_replica_keeps_it(
    upstream: OpenAIUpstream, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    def config(*revisions: tuple[str, str]) -> ServerConfig:
        return ServerConfig(
            upstream=upstream.base_url, redis_url=redis_url, namespace=namespace, access_log=False,
            model_revisions=revisions,
        )  # fmt: skip

    with (
        ProxyThread(config((MODEL, "r1")), registry()) as a,
        ProxyThread(config((MODEL, "r1")), registry()) as b,
    ):
        assert ask(a, QUESTIONS[0]) == "miss"
        assert ask(b, QUESTIONS[0]) == "hit"
        started = httpx.post(
            a.url + "/admin/refresh", json={"model": MODEL, "revision": "r2", "budget": 1}, headers=HEADERS
        )
        assert started.status_code == 202
        assert finished(a)["refreshed"] == 1
        deadline = time.monotonic() + 5
        while b.runtime.cache.model_revisions.get(MODEL) != "r2":  # pub/sub reaches B
            assert time.monotonic() < deadline, "replica B never heard of the switch"
            time.sleep(0.02)
        calls = upstream.count(CHAT)
        assert ask(b, QUESTIONS[0]) == "hit"  # A's refreshed answer, under the new key
        assert upstream.count(CHAT) == calls
        # A replica started later with the old flag takes the recorded revision.
        with ProxyThread(config((MODEL, "r1")), registry()) as c:
            assert c.runtime.cache.model_revisions == {MODEL: "r2"}
            assert ask(c, QUESTIONS[0]) == "hit"
    assert upstream.count(CHAT) == calls


def test_model_revision_flags() -> None:
    args = parser().parse_args(
        ["--upstream", "http://up/v1", "--model-revision", f"{MODEL}=2024-08", "--model-revision", "m2="]
    )
    config, _ = config_from(args)
    assert config.model_revisions == ((MODEL, "2024-08"), ("m2", ""))
    with pytest.raises(SystemExit):
        parser().parse_args(["--model-revision", "no-equals-sign"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--model-revision", "=r1"])
    with pytest.raises(ConfigError, match="twice"):
        ServerConfig(model_revisions=((MODEL, "a"), (MODEL, "b")))
    with pytest.raises(ConfigError, match="pairs"):
        ServerConfig(model_revisions=((MODEL,),))  # type: ignore[arg-type]
