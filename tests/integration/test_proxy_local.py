"""The local-engine upstream (the default of `cachelm serve`): a real engine with a tiny random-weight model
and its KV prefix cache, behind the proxy, reached with the openai SDK. Hits equal recomputation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cachelm.semantic.embedder import HashingEmbedder
from cachelm.server.config import ServerConfig
from cachelm.server.local import LocalEngineUpstream
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.server.testing import ProxyThread

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def engine() -> Any:
    from cachelm.engine.engine import Engine, build_prefix_cache
    from cachelm.engine.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    return Engine(
        model, tiny_tokenizer(), prefix_cache=build_prefix_cache(model, model_id=MODEL, block_size=4)
    )


@pytest.fixture
def proxy(engine: Any, tmp_path: Path) -> Iterator[ProxyThread]:
    config = ServerConfig(store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False)  # upstream: local
    upstream = LocalEngineUpstream(engine, model_id=MODEL, embedder=HashingEmbedder)
    with ProxyThread(config, upstream=upstream) as server:
        yield server


def request(text: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    return {"model": MODEL, "temperature": 0, "max_tokens": 12, "messages": messages, **extra}


def test_local_engine_answers_stream_and_hits_equal_recompute(proxy: ProxyThread, engine: Any) -> None:
    from cachelm.engine.engine import SamplingParams

    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=60)
    body = request("What is the capital of France?")
    recomputed = engine.generate(body["messages"], SamplingParams(max_new_tokens=12)).text
    usage = {"include_usage": True}  # recorded with the answer, so hits report (and credit) tokens
    streamed = c.chat.completions.with_raw_response.create(**body, stream=True, stream_options=usage)
    assert streamed.headers["x-cachelm-cache"] == "miss"
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed.parse() if ch.choices)
    assert text == recomputed
    hit = c.chat.completions.with_raw_response.create(**body)
    assert hit.headers["x-cachelm-cache"] == "hit"
    answer = hit.parse()
    assert answer.choices[0].message.content == recomputed
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_kv_prefix_cache_is_never_shared_across_tenants(engine: Any, tmp_path: Path) -> None:
    keys = {"acme": "acme-local-key-1", "globex": "globex-local-key-1"}
    registry = TenantRegistry.from_config({"tenants": {t: {"keys": [hash_key(k)]} for t, k in keys.items()}})
    config = ServerConfig(store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False)
    body = request("A cache keeps the results of earlier work so that later requests are answered faster.")
    bypass = {"x-cachelm-bypass": "on"}  # straight to the engine every time: only the KV layer can reuse

    def cached_tokens(tenant: str) -> int:
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=keys[tenant], max_retries=0, timeout=60)
        usage = c.chat.completions.create(**body, extra_headers=bypass).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        return int(usage.prompt_tokens_details.cached_tokens or 0)

    with ProxyThread(config, registry, upstream=LocalEngineUpstream(engine, model_id=MODEL)) as proxy:
        first = cached_tokens("acme")
        again = cached_tokens("acme")
        other = cached_tokens("globex")
    assert first == 0 and again > 0  # the tenant's own prefix is reused
    assert other == 0  # the same prompt from another tenant computes its own KV


def test_erasing_a_user_erases_the_kv_of_the_tenants_prompts(engine: Any, tmp_path: Path) -> None:
    keys = {"initech": "initech-local-key", "umbrella": "umbrella-local-key"}  # new to the engine
    tenants = {t: {"keys": [hash_key(k)]} for t, k in keys.items()}
    registry = TenantRegistry.from_config({"tenants": tenants, "admin_keys": [hash_key("local-admin")]})
    config = ServerConfig(store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False)
    body = request("Erasure must reach every layer that holds what a user sent, the KV cache included.")

    def cached_tokens(tenant: str) -> int:
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=keys[tenant], max_retries=0, timeout=60)
        bypass = {"x-cachelm-bypass": "on"}  # straight to the engine: only the KV layer can reuse
        usage = c.chat.completions.create(**body, user="alice", extra_headers=bypass).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        return int(usage.prompt_tokens_details.cached_tokens or 0)

    with ProxyThread(config, registry, upstream=LocalEngineUpstream(engine, model_id=MODEL)) as proxy:
        assert cached_tokens("initech") == 0 and cached_tokens("umbrella") == 0
        reused = cached_tokens("initech")
        assert reused > 0 and cached_tokens("umbrella") == reused
        erased = httpx.post(
            proxy.url + "/admin/erase",
            json={"tenant": "initech", "user": "alice"},
            headers={"authorization": "Bearer local-admin"},
        )
        assert erased.status_code == 200
        assert erased.json()["kv_blocks"] >= reused // 4  # block size 4: at least the blocks that were reused
        assert cached_tokens("initech") == 0  # recomputed: nothing of initech's prompt is left
        assert cached_tokens("umbrella") == reused  # another tenant's KV is untouched


def test_local_engine_completions_stop_and_refusals(proxy: ProxyThread, engine: Any) -> None:
    from cachelm.engine.engine import SamplingParams

    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=60)
    full = engine.generate("The quick brown fox", SamplingParams(max_new_tokens=10)).text
    answer = c.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0)
    assert answer.choices[0].text == full
    if len(full.strip()) > 2:  # a stop string cuts the answer where it first appears
        stop = full.strip()[1:3]
        cut = c.completions.create(
            model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == full[: full.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(**dict(request("hi"), model="gpt-4o"))
    with pytest.raises(openai.BadRequestError, match="`n`"):
        c.chat.completions.create(**request("hi", n=2))
    with pytest.raises(openai.NotFoundError, match="local embeddings"):
        c.embeddings.create(model=MODEL, input="x")


def test_local_embeddings_through_the_embedding_cache(proxy: ProxyThread) -> None:
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="open", max_retries=0, timeout=60)
    embedder = HashingEmbedder()
    first = c.embeddings.with_raw_response.create(model=embedder.model_id, input=["red apple", "green pear"])
    second = c.embeddings.with_raw_response.create(model=embedder.model_id, input=["green pear", "blue plum"])
    assert second.headers["x-cachelm-hits"] == "1/2"
    expected = embedder.embed(["green pear", "blue plum"])
    for got, want in zip(second.parse().data, expected, strict=True):
        assert got.embedding == pytest.approx([float(x) for x in want], abs=1e-6)
    assert first.headers["x-cachelm-cache"] == "miss"


def test_default_serve_without_the_model_is_a_clear_startup_error(tmp_path: Path) -> None:
    # A model path that does not exist stands in for "no packaged model here": serve must refuse to
    # start with a message naming the model and the alternative, not crash later on the first request.
    from cachelm.server.runtime import Runtime
    from cachelm.server.tenants import TenantRegistry

    config = ServerConfig(store_url=f"sqlite:///{tmp_path}/c.db", local_model=str(tmp_path / "missing.gguf"))
    with pytest.raises(Exception, match=r"cannot load the local model .*--upstream URL"):
        Runtime(config, TenantRegistry())
