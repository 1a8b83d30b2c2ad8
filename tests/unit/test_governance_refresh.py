"""Model-version refresh (`Governance.refresh_on_model_change`) on real stores (SQLite, Redis).

The "old model" and "new model" are deterministic functions of the request (`answer(request, version=…)`),
so a refreshed entry can be compared with a recomputation. The expected ranking is computed here from the
documented formula, independently of the implementation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cachelm.crypto import Keyring
from cachelm.errors import BackendError, ConfigError
from cachelm.governance import Governance, RequestLog
from cachelm.governance.journal import REQUEST_TAG
from cachelm.metrics import DEFAULT_PRICES
from cachelm.response.exact import ExactCache
from cachelm.semantic import EmbeddingCache, FlatIndex, SemanticCache, StaticThreshold
from cachelm.store import MemoryStore, Store
from cachelm.store.base import Match
from cachelm.store.encrypted import EncryptedStore
from cachelm.store.sqlite import SQLiteStore
from tests.unit.test_governance import EMB, answer, chat, open_store

MODEL = "gpt-4o-mini"
DAY = 86400.0
# text, hits, age in days: values spread over two orders of magnitude, ranking not by any single factor.
SPEC = [
    ("What is the capital of France?", 40, 1.0),
    ("Explain the difference between TCP and UDP in networking terms", 5, 0.5),
    ("How do I reverse a list in Python?", 20, 14.0),
    ("Summarise the plot of Hamlet in three sentences for a student", 12, 3.0),
    ("What is 2 + 2?", 2, 0.1),
    ("Translate good morning into Spanish", 0, 0.0),
    ("List three prime numbers", 9, 30.0),
    ("Why is the sky blue during the day but red at sunset?", 1, 2.0),
]


def expected_value(text: str, hits: int, age_days: float) -> float:
    """The documented default: (hits + 1) × cost × 2^(−age / 7 days), cost from usage × price."""
    usage = answer(chat(text))["usage"]
    price = DEFAULT_PRICES[MODEL]
    cost = (usage["prompt_tokens"] * price.input + usage["completion_tokens"] * price.output) / 1e6
    return float((hits + 1) * cost * 2.0 ** (-age_days * DAY / (7 * DAY)))


def ranked_texts() -> list[str]:
    return [t for t, *_ in sorted(SPEC, key=lambda s: -expected_value(*s))]


def new_model(request: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
    assert endpoint == "chat.completions"
    return answer(dict(request), version="v2")


def seed(gov: Governance, *, now: float, tenant: str = "acme") -> dict[str, str]:
    """Store SPEC's answers of the old model with known hits and ages (logged, indexed); text → key."""
    keys = {}
    for text, hits, age_days in SPEC:
        request = chat(text)
        key = gov.exact.key_for(request, tenant=tenant)
        record = gov.exact.make_record(
            key, request, answer(request), tenant=tenant, created=now - age_days * DAY
        )
        gov.exact.backend.put(dataclasses.replace(record, hits=hits))
        assert gov.remember(request, key, endpoint="chat.completions")
        keys[text] = key
    return keys


def make_gov(store: Store) -> Governance:
    semantic = SemanticCache(
        embedder=EmbeddingCache(MemoryStore(), EMB), index=FlatIndex(EMB.dim), rule=StaticThreshold(0.9)
    )
    return Governance(ExactCache(store, model_revisions={MODEL: "r1"}), semantic=semantic)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    with open_store(request.param, request) as s:
        yield s


class Recorder:
    """A recompute that records the requests it was given (and answers as the new model)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, request: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
        self.texts.append(request["messages"][-1]["content"])
        return new_model(request, endpoint)


def test_refresh_recomputes_the_most_valuable_entries_and_drops_the_rest(store: Store) -> None:
    gov = make_gov(store)
    old_keys = seed(gov, now=gov.exact.clock())
    calls = Recorder()

    job = gov.refresh_on_model_change(MODEL, "r2", recompute=calls, budget=3)
    final = job.result(timeout=30)

    top = ranked_texts()[:3]
    assert calls.texts == top  # the three most valuable, best first
    assert (final.state, final.old_entries, final.planned) == ("done", len(SPEC), 3)
    assert (final.refreshed, final.already_fresh, final.failed, final.dropped) == (3, 0, 0, len(SPEC) - 3)
    # Another process's view of the new revision: refreshed answers are the recomputed ones, the rest miss.
    reader = ExactCache(store, model_revisions={MODEL: "r2"})
    for text, *_ in SPEC:
        hit = reader.lookup(chat(text), tenant="acme")
        if text in top:
            assert hit is not None and hit.response == new_model(chat(text), "chat.completions"), text
            assert RequestLog(store).get(hit.key, tenant="acme") is not None
        else:
            assert hit is None, text
    # Nothing of the old revision is left: no answer, no logged request.
    assert all(store.peek(k) is None and store.peek(f"request:{k}") is None for k in old_keys.values())
    assert len(list(store.scan(Match(tag=REQUEST_TAG)))) == 3
    assert final.spent_usd == pytest.approx(sum(expected_value(t, 0, 0) for t in top))


def test_old_answers_leave_service_before_the_job_runs_and_semantic_hits_follow_the_new_keys(
    store: Store,
) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    assert gov.semantic is not None
    paraphrase = chat("what is the capital of france")
    before = gov.semantic.lookup(paraphrase, tenant="acme")
    assert before is not None and store.peek(before.response_key) is not None

    job = gov.refresh_on_model_change(MODEL, "r2", recompute=new_model, budget=1, start=False)

    # Planned, not run: every request misses, exactly and semantically (no old-revision answer served).
    assert all(gov.exact.lookup(chat(t), tenant="acme") is None for t, *_ in SPEC)
    assert gov.semantic.lookup(paraphrase, tenant="acme") is None
    assert job.progress.state == "planned"
    job.run()
    after = gov.semantic.lookup(paraphrase, tenant="acme")
    assert after is not None and after.response_key != before.response_key
    served = gov.exact.backend.peek(after.response_key)
    assert (
        served is not None
        and served.value
        == ExactCache(MemoryStore())
        .make_record("k", chat(SPEC[0][0]), new_model(chat(SPEC[0][0]), "chat.completions"))
        .value
    )
    assert gov.semantic.lookup(chat("How do I reverse a list in Python?"), tenant="acme") is None


def test_a_revision_switch_alone_stops_semantic_hits_on_old_answers(store: Store) -> None:
    """Between the switch and the removal of old entries (or in a process that switched without a
    refresh) a semantic lookup must not serve an old-revision answer: the revision is in the context key."""
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    assert gov.semantic is not None
    paraphrase = chat("what is the capital of france")
    before = gov.semantic.lookup(paraphrase, tenant="acme")
    assert before is not None

    gov.exact.set_model_revision(MODEL, "r2", purge=False)  # no refresh: the old entries stay indexed

    assert store.peek(before.response_key) is not None  # the old answer is still there...
    assert gov.semantic.lookup(paraphrase, tenant="acme") is None  # ...and no longer found
    gov.exact.set_model_revision(MODEL, "r1", purge=False)
    back = gov.semantic.lookup(paraphrase, tenant="acme")
    assert back is not None and back.response_key == before.response_key


def test_governance_refuses_a_semantic_cache_with_other_revisions(store: Store) -> None:
    exact = ExactCache(store, model_revisions={MODEL: "r1"})
    semantic = SemanticCache(
        embedder=EMB,
        index=FlatIndex(EMB.dim),
        model_revisions={MODEL: "r1"},  # a copy, not the mapping
    )
    with pytest.raises(ConfigError, match="model_revisions"):
        Governance(exact, semantic=semantic)
    shared = SemanticCache(embedder=EMB, index=FlatIndex(EMB.dim), model_revisions=exact.model_revisions)
    assert Governance(exact, semantic=shared).semantic is shared
    with pytest.raises(ConfigError, match="model_revisions"):
        SemanticCache(embedder=EMB, index=FlatIndex(EMB.dim), model_revisions=[("m", "r")])  # type: ignore[arg-type]


def test_a_recompute_that_takes_a_tenant_is_told_whose_request_it_is(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock(), tenant="acme")
    seen: list[str] = []

    def recompute(request: Mapping[str, Any], endpoint: str, *, tenant: str) -> dict[str, Any]:
        seen.append(tenant)
        return new_model(request, endpoint)

    final = gov.refresh_on_model_change(MODEL, "r2", recompute=recompute, budget=2).result(timeout=30)
    assert final.refreshed == 2 and seen == ["acme", "acme"]


def test_upstream_failures_cache_nothing_and_are_counted(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    failing = {SPEC[0][0]: "raise", SPEC[2][0]: "error-body", SPEC[3][0]: "incomplete"}

    def flaky(request: Mapping[str, Any], endpoint: str) -> Mapping[str, Any]:
        mode = failing.get(request["messages"][-1]["content"])
        if mode == "raise":
            raise BackendError("upstream 503")
        if mode == "error-body":
            return {"error": {"message": "overloaded", "type": "server_error"}}
        good = new_model(request, endpoint)
        if mode == "incomplete":
            good["choices"][0]["finish_reason"] = None
        return good

    final = gov.refresh_on_model_change(MODEL, "r2", recompute=flaky, budget=len(SPEC)).result(timeout=30)

    assert (final.state, final.failed, final.refreshed, final.dropped) == ("done", 3, len(SPEC) - 3, 0)
    assert len(final.errors) == 3 and all("capital" not in e for e in final.errors)  # no request text
    assert gov.exact.metrics.count("errors", layer="governance", kind="refresh") == 3
    assert gov.semantic is not None
    for text, *_ in SPEC:
        key = gov.exact.key_for(chat(text), tenant="acme")
        assert (store.peek(key) is None) == (text in failing), text
        assert (store.peek(f"request:{key}") is None) == (text in failing), text
    assert gov.semantic.lookup(chat("what is the capital of france"), tenant="acme") is None


def test_a_failing_log_write_undoes_the_answer(store: Store) -> None:
    """The request log lives on a Redis server that is down: the answers written first are removed."""
    from cachelm.store.redis import RedisStore

    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    job = gov.refresh_on_model_change(MODEL, "r2", recompute=new_model, budget=2, start=False)
    with RedisStore.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2) as down:
        gov.log = RequestLog(down)
        final = job.run()
    assert (final.failed, final.refreshed) == (2, 0)
    assert all("BackendError" in e for e in final.errors)
    assert list(store.scan()) == []  # neither answer stayed
    assert gov.semantic is not None
    assert gov.semantic.lookup(chat("what is the capital of france"), tenant="acme") is None


def test_cancel_stops_the_job_while_requests_keep_working(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    entered, release = threading.Event(), threading.Event()
    calls = Recorder()

    def slow(request: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
        entered.set()
        assert release.wait(10)
        return calls(request, endpoint)

    job = gov.refresh_on_model_change(MODEL, "r2", recompute=slow, budget=len(SPEC))
    assert entered.wait(10) and job.progress.state == "running"
    # A live request for an entry the job has not reached: a miss, computed by the new model and stored.
    live = chat(ranked_texts()[-1])
    response, hit = gov.exact.get_or_compute(live, lambda: new_model(live, "chat.completions"), tenant="acme")
    assert not hit and response == new_model(live, "chat.completions")
    job.cancel()
    release.set()
    final = job.result(timeout=10)

    assert final.state == "cancelled" and calls.texts == ranked_texts()[:1]  # the entry in flight completed
    assert (final.refreshed, final.failed, final.dropped) == (1, 0, len(SPEC) - 1)
    reader = ExactCache(store, model_revisions={MODEL: "r2"})
    found = {t for t, *_ in SPEC if reader.lookup(chat(t), tenant="acme") is not None}
    assert found == {ranked_texts()[0], ranked_texts()[-1]}


def test_an_entry_recomputed_by_live_traffic_first_is_kept_without_a_call(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    job = gov.refresh_on_model_change(MODEL, "r2", recompute=Recorder(), budget=2, start=False)
    top = chat(ranked_texts()[0])
    assert gov.exact.store(top, new_model(top, "chat.completions"), tenant="acme") is not None  # no log
    calls = job.recompute
    final = job.run()
    assert isinstance(calls, Recorder) and calls.texts == ranked_texts()[1:2]
    assert (final.already_fresh, final.refreshed) == (1, 1)
    key = gov.exact.key_for(top, tenant="acme")
    assert gov.log.get(key, tenant="acme") is not None  # logged and indexed on the way
    assert gov.semantic is not None and gov.semantic.lookup(top, tenant="acme") is not None


def test_a_usd_budget_buys_the_best_entries_that_fit(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    order = ranked_texts()
    cost = {t: expected_value(t, 0, 0) for t in order}  # hits 0, age 0: the bare recompute cost
    budget = cost[order[0]] + cost[order[1]] + 1e-12
    calls = Recorder()
    final = gov.refresh_on_model_change(MODEL, "r2", recompute=calls, budget=budget).result(timeout=30)
    fits, spent = [], 0.0
    for text in order:  # greedy by value, skipping what does not fit
        if spent + cost[text] <= budget:
            fits.append(text)
            spent += cost[text]
    assert calls.texts == fits and len(fits) >= 2
    assert final.spent_usd == pytest.approx(spent) and final.spent_usd <= budget


def test_scope_unlogged_entries_other_models_and_tenants(store: Store) -> None:
    gov = make_gov(store)
    now = gov.exact.clock()
    seed(gov, now=now)
    unlogged_old = gov.exact.make_record(
        "u" * 64, chat("old, no log"), answer(chat("old, no log")), tenant="acme", created=now - DAY
    )
    unlogged_new = gov.exact.make_record(
        "n" * 64, chat("new, no log"), answer(chat("new, no log")), tenant="acme", created=now + 5
    )
    store.put(unlogged_old)
    store.put(unlogged_new)
    other_model = gov.store(chat("hi", model="gpt-4o"), answer(chat("hi", model="gpt-4o")), tenant="acme")
    other_tenant = gov.store(chat("hi"), answer(chat("hi")), tenant="globex")
    assert other_model and other_tenant

    job = gov.refresh_on_model_change(
        MODEL, "r2", recompute=new_model, budget=0, tenant="acme", switched_at=now + 1
    )
    final = job.result(timeout=30)

    assert (final.old_entries, final.planned, final.dropped) == (len(SPEC) + 1, 0, len(SPEC) + 1)
    assert job.plan.unlogged == 1
    assert store.peek(unlogged_old.key) is None and store.peek(unlogged_new.key) is not None
    assert store.peek(other_model) is not None and store.peek(other_tenant) is not None


def test_bad_arguments_name_themselves(store: Store) -> None:
    gov = make_gov(store)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"budget": True}, "budget"),
        ({"budget": -1}, "budget"),
        ({"budget": float("inf")}, "budget"),
        ({"budget": 1, "value": 3}, "value"),
        ({"budget": 1, "tenant": ""}, "tenant"),
        ({"budget": 1, "switched_at": "now"}, "switched_at"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ConfigError, match=f"`{name}`"):
            gov.refresh_on_model_change(MODEL, "r2", recompute=new_model, **kwargs)
    with pytest.raises(ConfigError, match="`model`"):
        gov.refresh_on_model_change("", "r2", recompute=new_model, budget=1)
    assert gov.exact.model_revisions == {MODEL: "r1"}  # a rejected call switched nothing
    with pytest.raises(ConfigError, match="`recompute`"):
        gov.refresh_on_model_change(MODEL, "r2", recompute="http://x", budget=1)
    job = gov.refresh_on_model_change(MODEL, "r3", recompute=new_model, budget=1, start=False)
    with pytest.raises(ConfigError, match="never started"):
        job.wait(0)
    job.run()
    with pytest.raises(ConfigError, match="already done"):
        job.start()


class Halt(BaseException):
    """Not an entry's failure: something that must stop the job (as KeyboardInterrupt would)."""


def test_a_crash_stops_the_job_and_surfaces_through_result(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    calls = Recorder()

    def crashing(request: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
        if calls.texts:
            raise Halt
        return calls(request, endpoint)

    job = gov.refresh_on_model_change(MODEL, "r2", recompute=crashing, budget=4)
    with pytest.raises(Halt):
        job.result(timeout=30)
    final = job.progress
    assert (final.state, final.refreshed, final.failed, final.dropped) == ("crashed", 1, 0, len(SPEC) - 1)
    assert len([r for r in store.scan() if not r.key.startswith("request:")]) == 1


async def test_join_awaits_the_job_without_blocking_the_loop(store: Store) -> None:
    gov = make_gov(store)
    seed(gov, now=gov.exact.clock())
    release = threading.Event()

    def gated(request: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
        assert release.wait(10)
        return new_model(request, endpoint)

    job = gov.refresh_on_model_change(MODEL, "r2", recompute=gated, budget=2)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, release.set)  # runs only if the loop is free while join() waits
    final = await job.join()
    assert (final.state, final.refreshed) == ("done", 2)


def test_a_second_run_for_the_same_revision_keeps_answers_it_cannot_key(store: Store) -> None:
    gov = make_gov(store)
    now = gov.exact.clock()
    seed(gov, now=now)
    gov.refresh_on_model_change(MODEL, "r2", recompute=new_model, budget=2).result(timeout=30)
    live = chat("written by the proxy after the switch")
    key = gov.exact.store(live, answer(live, version="v2"), tenant="acme")  # no logged request
    assert key is not None
    again = gov.refresh_on_model_change(MODEL, "r2", recompute=new_model, budget=8).result(timeout=30)
    assert again.old_entries == 0 and store.peek(key) is not None
    assert sum(1 for t, *_ in SPEC if gov.exact.lookup(chat(t), tenant="acme") is not None) == 2


def test_on_an_encrypted_store_questions_are_sealed_and_refresh_works(tmp_path: Path) -> None:
    """The request log inherits at-rest encryption: no question reaches the file; refresh still works."""
    inner = SQLiteStore(tmp_path / "sealed.db")
    with EncryptedStore(inner, Keyring.generate()) as store:
        gov = make_gov(store)
        seed(gov, now=gov.exact.clock())
        final = gov.refresh_on_model_change(MODEL, "r2", recompute=new_model, budget=2).result(timeout=30)
        assert (final.refreshed, final.dropped) == (2, len(SPEC) - 2)
        top = chat(ranked_texts()[0])
        hit = gov.exact.lookup(top, tenant="acme")
        assert hit is not None and hit.response == new_model(top, "chat.completions")
        inner.flush_hits()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("sealed.db"))
    assert len(raw) > 0 and b"request:" in raw  # the log records are there (their keys are not secret)...
    assert all(text.encode() not in raw for text, *_ in SPEC)  # ...but no question, old or new, in clear
