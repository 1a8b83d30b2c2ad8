"""The proxy keeps the request behind each answer, so governance can refresh proxy-written entries."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from cachelm.governance.journal import RequestLog
from cachelm.server.config import ServerConfig
from cachelm.server.testing import ProxyThread
from cachelm.store.sqlite import SQLiteStore
from tests.upstream import OpenAIUpstream


@pytest.mark.parametrize("request_log", [True, False])
def test_proxy_logs_the_request_behind_each_answer(
    tmp_path: Path, upstream: OpenAIUpstream, request_log: bool
) -> None:
    db = tmp_path / "cache.db"
    config = ServerConfig(upstream=upstream.base_url, store_url=f"sqlite:///{db}", request_log=request_log)
    messages = [{"role": "user", "content": "Name a prime number."}]
    with ProxyThread(config) as proxy:
        client = OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="m", temperature=0, messages=messages)
        assert raw.headers["x-cachelm-cache"] == "miss"
        key = proxy.runtime.cache.key_for(
            {"model": "m", "temperature": 0, "messages": messages}, tenant="default"
        )
    store = SQLiteStore(db)
    try:
        logged = RequestLog(store).get(key, tenant="default")
    finally:
        store.close()
    if request_log:
        assert logged is not None and logged.request["messages"] == messages and logged.model == "m"
    else:
        assert logged is None
