"""The LangChain BaseCache adapter, exercised through langchain-core's own model classes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation

from cachelm.errors import ConfigError
from cachelm.response.exact import ExactCache
from cachelm.response.langchain import LangChainCache, model_of
from cachelm.store.base import Record
from cachelm.store.memory import MemoryStore
from cachelm.store.sqlite import SQLiteStore


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ExactCache]:
    with SQLiteStore(tmp_path / "lc.db") as store:
        yield ExactCache(store)


@pytest.fixture
def global_cache(cache: ExactCache) -> Iterator[LangChainCache]:
    previous = get_llm_cache()
    adapter = LangChainCache(cache)
    set_llm_cache(adapter)
    yield adapter
    set_llm_cache(previous)


def test_llm_second_call_is_served_from_the_cache(global_cache: LangChainCache) -> None:
    llm = FakeListLLM(responses=["first answer", "second answer"])
    assert llm.invoke("what is 2+2?") == "first answer"
    assert llm.invoke("what is 2+2?") == "first answer"  # a recompute would have said "second answer"
    assert llm.i == 1  # the model ran once
    assert llm.invoke("another prompt") == "second answer"
    assert global_cache.cache.metrics.count("hits", layer="exact") == 1


def test_chat_generations_round_trip(cache: ExactCache) -> None:
    adapter = LangChainCache(cache, tenant="acme")
    chat = FakeListChatModel(responses=["bonjour", "salut"], cache=adapter)
    first = chat.invoke("say hello in French")
    second = chat.invoke("say hello in French")
    assert chat.i == 1
    assert isinstance(second, AIMessage)
    assert (second.content, second.id) == (first.content, first.id)


def test_generations_round_trip_exactly(cache: ExactCache) -> None:
    adapter = LangChainCache(cache)
    message = AIMessage(
        content="hi",
        tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "call_1"}],
        usage_metadata={"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
        response_metadata={"model_name": "m"},
    )
    generations = [
        ChatGeneration(message=message, generation_info={"finish_reason": "stop"}),
    ]
    adapter.update("prompt", "llm-config", generations)
    assert adapter.lookup("prompt", "llm-config") == generations
    text = [Generation(text="a", generation_info={"logprobs": None}), Generation(text="b")]
    adapter.update("p2", "llm-config", text)
    assert adapter.lookup("p2", "llm-config") == text
    assert adapter.lookup("p2", "other-config") is None


async def test_async_variants(cache: ExactCache) -> None:
    adapter = LangChainCache(cache)
    llm = FakeListLLM(responses=["one", "two"], cache=adapter)
    assert await llm.ainvoke("q") == "one"
    assert await llm.ainvoke("q") == "one"
    assert llm.i == 1
    await adapter.aupdate("x", "y", [Generation(text="z")])
    assert await adapter.alookup("x", "y") == [Generation(text="z")]
    await adapter.aclear()
    assert await adapter.alookup("x", "y") is None


def test_clear_is_per_tenant_and_spares_other_entries(cache: ExactCache) -> None:
    acme, globex = LangChainCache(cache, tenant="acme"), LangChainCache(cache, tenant="globex")
    acme.update("p", "cfg", [Generation(text="a")])
    globex.update("p", "cfg", [Generation(text="g")])
    req = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "x"}]}
    cache.store(
        req, {"choices": [{"index": 0, "message": {"content": "y"}, "finish_reason": "stop"}]}, tenant="acme"
    )
    acme.clear()
    assert acme.lookup("p", "cfg") is None
    assert globex.lookup("p", "cfg") == [Generation(text="g")]
    assert cache.lookup(req, tenant="acme") is not None


def test_model_name_is_recorded_for_invalidation(cache: ExactCache) -> None:
    llm_string = "[('_type', 'openai-chat'), ('model_name', 'gpt-4o-mini'), ('temperature', 0.0)]"
    assert model_of(llm_string) == "gpt-4o-mini"
    adapter = LangChainCache(cache)
    adapter.update("p", llm_string, [Generation(text="t")])
    assert cache.invalidate_model("gpt-4o-mini") == 1
    assert adapter.lookup("p", llm_string) is None


def test_a_foreign_value_is_a_miss_and_is_dropped() -> None:
    store = MemoryStore()
    adapter = LangChainCache(store)
    key = adapter.cache.key_for(adapter._request("p", "cfg"), endpoint="langchain")
    store.put(Record(key=key, value=b'{"not": "generations"}', tags=frozenset({"langchain"})))
    assert adapter.lookup("p", "cfg") is None
    assert store.peek(key) is None
    assert adapter.cache.metrics.count("errors", kind="decode") == 1


def test_unencodable_generation_info_is_not_cached_and_does_not_raise(cache: ExactCache) -> None:
    adapter = LangChainCache(cache)
    adapter.update("p", "cfg", [Generation(text="t", generation_info={"obj": object()})])
    assert adapter.lookup("p", "cfg") is None
    assert cache.metrics.count("errors", kind="encode") == 1


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="`cache`"):
        LangChainCache({})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`tenant`"):
        LangChainCache(MemoryStore(), tenant="")
