"""Erasing a user or purging answers also removes their vectors from the semantic index."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from cachelm.semantic.embedder import HashingEmbedder
from cachelm.server.config import ServerConfig
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.server.testing import ProxyThread
from tests.at_rest import raw_bytes
from tests.upstream import OpenAIUpstream

ADMIN = "admin-secret-key-0123"
KEY = "acme-key-0123456789"


def ask(client: openai.OpenAI, text: str, user: str) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, user=user, messages=[{"role": "user", "content": text}]
    )
    return str(raw.headers["x-cachelm-cache"])


def test_erase_user_and_purge_remove_semantic_entries(upstream: OpenAIUpstream, tmp_path: Path) -> None:
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", semantic=True,
        semantic_embedder="hashing", semantic_threshold=0.8, access_log=False,
    )  # fmt: skip
    registry = TenantRegistry.from_config(
        {"tenants": {"acme": {"keys": [hash_key(KEY)]}}, "admin_keys": [hash_key(ADMIN)]}
    )
    admin: dict[str, Any] = {"authorization": f"Bearer {ADMIN}"}
    with ProxyThread(config, registry) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        assert ask(client, "What is the capital city of France?", "alice") == "miss"
        assert ask(client, "How do I bake sourdough bread at home?", "bob") == "miss"
        assert ask(client, "Which planet is the largest one?", "carol") == "miss"
        semantic = proxy.runtime.semantic
        assert semantic is not None
        assert len(semantic.index) == 3

        erased = httpx.post(
            proxy.url + "/admin/erase", json={"tenant": "acme", "user": "alice"}, headers=admin
        )
        assert erased.status_code == 200
        assert len(semantic.index) == 2  # alice's vector went with her answer
        for text, gone in (
            ("What is the capital city of France?", True),
            ("Which planet is the largest one?", False),
        ):
            key = semantic.embeddings.key(text, tenant="acme")
            assert (proxy.runtime.records.peek(key) is None) is gone  # and her question's cached embedding
        # bob's paraphrase still hits: only alice's entry was removed
        assert ask(client, "how do I bake sourdough bread at home", "dave") == "semantic-hit"

        purged = httpx.post(
            proxy.url + "/admin/purge", json={"tenant": "acme", "user": "carol"}, headers=admin
        )
        assert purged.status_code == 200
        assert len(semantic.index) == 1
        bad = httpx.post(proxy.url + "/admin/purge", json={"older_than": "old"}, headers=admin)
        assert bad.status_code == 400 and "older_than" in bad.json()["error"]["message"]


@pytest.mark.parametrize("via", ["body", "header"])
def test_without_the_request_log_erasure_still_reaches_the_users_question_embeddings(
    upstream: OpenAIUpstream, tmp_path: Path, via: str
) -> None:
    """The user named by the body's `user` or by the `x-cachelm-user` header alike."""
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/cache.db", semantic=True,
        semantic_embedder="hashing", semantic_threshold=0.8, access_log=False, request_log=False,
    )  # fmt: skip
    registry = TenantRegistry.from_config(
        {"tenants": {"acme": {"keys": [hash_key(KEY)]}}, "admin_keys": [hash_key(ADMIN)]}
    )
    with ProxyThread(config, registry) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        if via == "body":
            assert ask(client, "What is the capital city of France?", "alice") == "miss"
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", temperature=0, extra_headers={"x-cachelm-user": "alice"},
                messages=[{"role": "user", "content": "What is the capital city of France?"}],
            )  # fmt: skip
            assert raw.headers["x-cachelm-cache"] == "miss"
        assert ask(client, "Which planet is the largest one?", "carol") == "miss"
        semantic = proxy.runtime.semantic
        assert semantic is not None
        keys = {
            "alice": semantic.embeddings.key("What is the capital city of France?", tenant="acme"),
            "carol": semantic.embeddings.key("Which planet is the largest one?", tenant="acme"),
        }
        assert all(proxy.runtime.records.peek(k) is not None for k in keys.values())
        erased = httpx.post(
            proxy.url + "/admin/erase",
            json={"tenant": "acme", "user": "alice"},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert erased.json() == {"deleted": 2}  # her answer and her question's embedding (no log to read)
        assert proxy.runtime.records.peek(keys["alice"]) is None
        assert proxy.runtime.records.peek(keys["carol"]) is not None


@pytest.mark.parametrize("sealed", [False, True], ids=["plaintext", "keyring"])
def test_erased_questions_and_their_vectors_leave_the_serversraw_bytes(
    upstream: OpenAIUpstream, tmp_path: Path, sealed: bool
) -> None:
    """Scan every file of the embedded store and its semantic index while the proxy runs. Without a
    keyring the kept user's question is there (the scan works) and the erased user's is not; with one,
    neither question nor vector is ever there in clear."""
    config = ServerConfig(
        upstream=upstream.base_url, store_url=f"sqlite:///{tmp_path}/data/cache.db", semantic=True,
        semantic_embedder="hashing", semantic_threshold=0.8, access_log=False,
        keyring="k1:" + base64.b64encode(bytes(range(32))).decode() if sealed else None,
    )  # fmt: skip
    registry = TenantRegistry.from_config(
        {"tenants": {"acme": {"keys": [hash_key(KEY)]}}, "admin_keys": [hash_key(ADMIN)]}
    )
    (tmp_path / "data").mkdir()
    questions = {"alice": "What is the capital city of France?", "bob": "How do I bake sourdough bread?"}
    vectors = {
        u: np.asarray(HashingEmbedder().embed([q])[0], dtype="<f4").tobytes() for u, q in questions.items()
    }
    with ProxyThread(config, registry) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        for user, question in questions.items():
            assert ask(client, question, user) == "miss"
        semantic = proxy.runtime.semantic
        assert semantic is not None
        semantic.index.flush()  # type: ignore[attr-defined]  # a graph snapshot would hold vectors too
        before = raw_bytes(tmp_path / "data")
        needles = {u: (questions[u].encode(), vectors[u]) for u in questions}
        visible = not sealed
        for user in questions:
            assert all((n in before) is visible for n in needles[user])
        erased = httpx.post(
            proxy.url + "/admin/erase",
            json={"tenant": "acme", "user": "alice"},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert erased.status_code == 200 and erased.json()["deleted"] >= 1
        after = raw_bytes(tmp_path / "data")
        assert not any(n in after for n in needles["alice"])
        assert all((n in after) is visible for n in needles["bob"])
