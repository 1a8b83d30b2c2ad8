"""The dashboard in headless Chromium (Debian package, driven by Playwright): numbers, charts, entries.

Needs ``chromium`` and the ``playwright`` package: ``bash tests/integration/browser.sh`` installs both.
Without them the test skips and says which one is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cachelm.server.config import ServerConfig
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.server.testing import ProxyThread
from tests.upstream import OpenAIUpstream

CHROMIUM = os.environ.get("CACHELM_CHROMIUM", "/usr/bin/chromium")
ADMIN = "dashboard-admin-key"
KEYS = {"acme": "acme-dashboard-key", "globex": "globex-dashboard-key"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the `playwright` package is not installed (run tests/integration/browser.sh)",
    ),
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() or shutil.which("chromium")),
        reason=f"no Chromium at {CHROMIUM} (run tests/integration/browser.sh: apt-get install chromium)",
    ),
]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyThread]:
    registry = TenantRegistry.from_config(
        {"admin_keys": [hash_key(ADMIN)], "tenants": {t: {"keys": [hash_key(k)]} for t, k in KEYS.items()}}
    )
    with OpenAIUpstream() as base_url:
        config = ServerConfig(upstream=base_url, store_url=f"sqlite:///{tmp_path}/cache.db", access_log=False)
        with ProxyThread(config, registry) as server:
            yield server


def traffic(proxy: ProxyThread) -> dict[str, int]:
    """3 acme questions (each asked twice) and 1 globex question: 4 misses, 3 hits, 4 entries."""
    sent = {"requests": 0, "hits": 0}
    for tenant, texts in (("acme", ["a", "b", "c", "a", "b", "c"]), ("globex", ["z"])):
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS[tenant], max_retries=0)
        for text in texts:
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": f"question {text}"}]
            )
            sent["requests"] += 1
            sent["hits"] += raw.headers["x-cachelm-cache"] == "hit"
    return sent


def test_dashboard_shows_stats_charts_and_entries(proxy: ProxyThread, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    sent = traffic(proxy)
    assert sent == {"requests": 7, "hits": 3}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            errors: list[Any] = []
            page.on("pageerror", lambda error: errors.append(error))
            page.goto(f"{proxy.url}/dashboard#key={ADMIN}")
            page.wait_for_function("document.getElementById('status').className === 'ok'", timeout=10_000)
            assert page.inner_text("#requests") == "7"
            assert page.inner_text("#hit-rate") == f"{100 * 3 / 7:.1f}%"
            assert page.inner_text("#entries-count") == "4"
            assert int(page.inner_text("#tokens-saved")) > 0
            assert page.locator("#chart-hit-rate polyline").count() == 1
            assert page.locator("#chart-latency polyline").count() == 2
            assert page.locator("#entries tbody tr").count() == 4
            page.select_option("#tenant", "globex")
            page.wait_for_function(
                "document.querySelectorAll('#entries tbody tr').length === 1", timeout=10_000
            )
            assert page.locator("#entries tbody tr").first.get_attribute("data-tenant") == "globex"
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            # A wrong key shows an error instead of numbers.
            page.fill("#admin-key", "not-the-admin-key")
            page.dispatch_event("#admin-key", "change")
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=10_000)
            assert "403" in page.inner_text("#status")
            assert errors == []
        finally:
            browser.close()
