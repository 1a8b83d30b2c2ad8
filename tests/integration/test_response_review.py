"""Review of the `openai` SDK wrapper, over real HTTP against the local OpenAI-protocol server.

Each test whose docstring names a defect failed before its fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cachelm.errors import ConfigError
from cachelm.response.exact import ExactCache
from cachelm.response.openai_client import cached
from cachelm.store.sqlite import SQLiteStore
from tests.upstream import OpenAIUpstream

CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def upstream() -> Iterator[OpenAIUpstream]:
    server = OpenAIUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path: Path, upstream: OpenAIUpstream) -> Iterator[ExactCache]:
    upstream.reset()
    with SQLiteStore(tmp_path / "cache.db") as store:
        yield ExactCache(store)


@pytest.fixture
def raw(upstream: OpenAIUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=upstream.base_url, api_key="test", max_retries=0)


def ask(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "temperature": 0}


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"user": None}, "`user`"),
        ({"tags": [1]}, "`tags`"),
        ({"tags": [""]}, "`tags`"),
        ({"allow_sampled": "no"}, "`allow_sampled`"),
    ],
)
def test_cached_checks_its_entry_options_up_front(
    raw: openai.OpenAI, cache: ExactCache, upstream: OpenAIUpstream, options: dict[str, Any], name: str
) -> None:
    """`user`, `tags` and `allow_sampled` were taken unchecked. A bad `user` or tag surfaced as a
    ConfigError from ExactCache.store *after* the upstream call had been made and paid for, so its answer
    was lost (and a streamed miss was silently never cached); ``allow_sampled="no"`` was truthy and cached
    sampled answers."""
    with pytest.raises(ConfigError, match=name):
        cached(raw, cache, **options)
    assert upstream.count(CHAT_PATH) == 0


def test_valid_entry_options_store_the_answer_they_paid_for(raw: openai.OpenAI, cache: ExactCache) -> None:
    """The good path beside the refusals above (passed before too)."""
    client = cached(raw, cache, user="alice", tags=("faq",))
    first = client.chat.completions.create(**ask("kept?"))
    assert client.chat.completions.create(**ask("kept?")).to_dict() == first.to_dict()
    assert cache.erase_user("default", "alice") == 1
