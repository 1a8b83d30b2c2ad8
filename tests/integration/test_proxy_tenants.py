"""Semantic hits through the proxy, and tenant isolation of every layer under randomized traffic."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import openai
import pytest

from cachelm.server.config import ServerConfig
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.server.testing import ProxyProcess, ProxyThread
from tests.upstream import OpenAIUpstream

KEYS = {name: f"{name}-key-0123456789" for name in ("acme", "globex", "initech", "warmup")}
ECHO = re.compile(r"^Echo from [^:]+: (.*)$")


def registry() -> TenantRegistry:
    return TenantRegistry.from_config({"tenants": {n: {"keys": [hash_key(k)]} for n, k in KEYS.items()}})


def proxy_for(upstream: OpenAIUpstream, tmp_path: Path, **extra: Any) -> ProxyThread:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", semantic=True,
        semantic_embedder="hashing", access_log=False, **extra,
    )  # fmt: skip
    return ProxyThread(config, registry())


def sdk(url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=20)


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": text}]}


def ask(c: openai.OpenAI, text: str, **extra: Any) -> tuple[str, str]:
    raw = c.chat.completions.with_raw_response.create(**chat(text), **extra)
    return raw.headers["x-cachelm-cache"], raw.parse().choices[0].message.content or ""


def test_semantic_hit_serves_the_near_duplicate_and_can_be_turned_off(
    upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    with proxy_for(upstream, tmp_path, semantic_threshold=0.8) as proxy:
        acme, globex = sdk(proxy.url, "acme"), sdk(proxy.url, "globex")
        assert ask(acme, "What is the capital city of France?")[0] == "miss"
        kind, text = ask(acme, "what is the capital city of France")
        assert kind == "semantic-hit"
        assert text == "Echo from gpt-4o-mini: What is the capital city of France?"  # the stored answer
        assert (
            ask(acme, "what is the capital city of France", extra_headers={"x-cachelm-semantic": "off"})[0]
            == "miss"
        )
        assert ask(globex, "what is the capital city of France?")[0] == "miss"  # never another tenant's entry
        assert ask(acme, "How do I bake sourdough bread at home?")[0] == "miss"  # unrelated: no false hit


def test_delta_bounded_rule_verifies_candidates_on_misses(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    with proxy_for(upstream, tmp_path, semantic_delta=0.05) as proxy:
        acme = sdk(proxy.url, "acme")
        assert ask(acme, "Tell me about the history of Rome")[0] == "miss"
        # Nothing certified yet: a close request is not served, it is verified against the fresh answer.
        assert ask(acme, "Tell me about the history of Rome!")[0] == "miss"
        assert (
            ask(acme, "Tell me about the history of Rome?", extra_headers={"x-cachelm-delta": "0.1"})[0]
            == "miss"
        )
        semantic = proxy.runtime.semantic
        assert semantic is not None
        assert semantic.default.stats.feedback >= 1  # the candidate's (wrong) answer was reported


def test_randomized_traffic_never_hits_across_tenants(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    rng = random.Random(1234)
    pool = [f"question number {i} about topic {i % 3}" for i in range(10)]
    tenants = ["acme", "globex", "initech"]
    seen: dict[str, set[str]] = {t: set() for t in tenants}
    embedded: dict[str, set[str]] = {t: set() for t in tenants}
    with proxy_for(upstream, tmp_path, semantic_threshold=0.9) as proxy:
        clients = {t: sdk(proxy.url, t) for t in [*tenants, "warmup"]}
        clients["warmup"].embeddings.create(model="text-embedding-3-small", input=["warm"])  # learns the size
        counts = {"hit": 0, "semantic-hit": 0, "miss": 0, "embedding-hits": 0}
        for _ in range(150):
            tenant = rng.choice(tenants)
            c = clients[tenant]
            if rng.random() < 0.7:
                text = rng.choice(pool) + rng.choice(["", "", "?"])
                kind, answer = ask(c, text, stream=False)
                echoed = ECHO.match(answer)
                assert echoed is not None
                if kind == "hit":
                    assert text in seen[tenant]
                elif kind == "semantic-hit":
                    assert echoed.group(1) in seen[tenant]  # only this tenant's own earlier question
                else:
                    assert kind == "miss" and text not in seen[tenant]
                counts[kind] += 1
                seen[tenant].add(text)
            else:
                texts = rng.sample(pool, 3)
                raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input=texts)
                expected_hits = sum(t in embedded[tenant] for t in texts)
                assert raw.headers["x-cachelm-hits"] == f"{expected_hits}/3"
                counts["embedding-hits"] += expected_hits
                embedded[tenant].update(texts)
    assert counts["hit"] > 0 and counts["miss"] > 0 and counts["embedding-hits"] > 0


@pytest.mark.slow
def test_semantic_index_on_pgvector_is_shared_by_replicas(
    upstream: OpenAIUpstream, redis_url: str, pg_url: str, namespace: str
) -> None:
    args = [
        "--upstream", upstream.base_url, "--redis", redis_url, "--namespace", namespace, "--pg-url", pg_url,
        "--semantic", "--semantic-embedder", "hashing", "--semantic-threshold", "0.8", "--no-access-log",
    ]  # fmt: skip
    env = {"CACHELM_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items())}
    with ProxyProcess(args, env=env) as a, ProxyProcess(args, env=env) as b:
        assert ask(sdk(a.url, "acme"), "Which river flows through the city of Paris?")[0] == "miss"
        kind, text = ask(sdk(b.url, "acme"), "which river flows through the city of Paris")
        assert kind == "semantic-hit"
        assert text == "Echo from gpt-4o-mini: Which river flows through the city of Paris?"
        assert ask(sdk(b.url, "globex"), "which river flows through the city of Paris")[0] == "miss"


def test_embedded_semantic_index_survives_a_restart(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    with proxy_for(upstream, tmp_path, semantic_threshold=0.8) as proxy:
        assert ask(sdk(proxy.url, "acme"), "Which planet is known as the red planet?")[0] == "miss"
    with proxy_for(
        upstream, tmp_path, semantic_threshold=0.8
    ) as proxy:  # same SQLite file, new process state
        kind, text = ask(sdk(proxy.url, "acme"), "which planet is known as the red planet")
    assert kind == "semantic-hit"
    assert text == "Echo from gpt-4o-mini: Which planet is known as the red planet?"
    assert sorted(p.name for p in tmp_path.iterdir() if ".semantic" in p.name)  # persisted beside the store
