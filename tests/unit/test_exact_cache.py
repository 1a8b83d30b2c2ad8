"""ExactCache: serving rules, single-flight, invalidation, erasure, JSONL export/import, on every store."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelm.clock import ManualClock
from cachelm.crypto import Keyring
from cachelm.errors import BackendError, ConfigError
from cachelm.keys import request_key, tenant_salt
from cachelm.metrics import CacheMetrics
from cachelm.response.exact import CachedResponse, ExactCache, cacheable_response
from cachelm.store.base import Match, Record, Store
from cachelm.store.encrypted import EncryptedStore
from cachelm.store.memory import MemoryStore
from cachelm.store.redis import RedisStore
from cachelm.store.sqlite import SQLiteStore
from cachelm.store.tiered import TieredStore

# Near real time: Redis drops records by its own clock (PEXPIREAT), so logical times must not lie in the past,
# and TTLs are long (an hour or more): the server must not expire an entry while the module runs.
T0 = float(int(time.time()))

# Every store the exact cache must work on; each is a real backend.
STORE_KINDS = ["memory", "sqlite", "redis", "encrypted-sqlite", "tiered"]


@contextlib.contextmanager
def make_store(kind: str, request: pytest.FixtureRequest, *, clock: ManualClock) -> Iterator[Store]:
    """A fresh, empty store of `kind` (SQLite in a temporary file, Redis under a unique namespace)."""
    store: Store
    if kind == "memory":
        store = MemoryStore(clock=clock)
    elif kind == "sqlite":
        tmp = request.getfixturevalue("tmp_path")
        store = SQLiteStore(tmp / "cache.db", clock=clock)
    elif kind == "encrypted-sqlite":
        tmp = request.getfixturevalue("tmp_path")
        store = EncryptedStore(SQLiteStore(tmp / "sealed.db", clock=clock), Keyring.generate())
    elif kind == "tiered":  # an in-process L1 over SQLite, as the proxy runs it
        tmp = request.getfixturevalue("tmp_path")
        store = TieredStore(MemoryStore(clock=clock), SQLiteStore(tmp / "l2.db", clock=clock))
    elif kind == "redis":
        url, ns = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
        store = RedisStore.from_url(url, namespace=ns, clock=clock)
    else:
        raise AssertionError(kind)
    try:
        yield store
    finally:
        if kind == "redis":
            store.clear()
        store.close()


def chat(text: str, *, model: str = "gpt-4o-mini", **params: Any) -> dict[str, Any]:
    return {"model": model, "temperature": 0, "messages": [{"role": "user", "content": text}], **params}


def answer(request: dict[str, Any], *, n: int = 0) -> dict[str, Any]:
    """A deterministic 'model': the answer is derived from the request only."""
    content = f"answer#{n} to {request['messages'][-1]['content']}"
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 1,
        "model": request["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, clock: ManualClock) -> Iterator[Store]:
    with make_store(request.param, request, clock=clock) as s:
        yield s


@pytest.fixture
def cache(store: Store, clock: ManualClock) -> ExactCache:
    return ExactCache(store, clock=clock, metrics=CacheMetrics())


# -- lookup / store ---------------------------------------------------------------------------------------


def test_store_then_lookup_returns_the_same_answer(cache: ExactCache) -> None:
    req = chat("2+2?")
    assert cache.lookup(req) is None
    key = cache.store(req, answer(req), tags=["math"], user="u1")
    assert key == cache.key_for(req)
    hit = cache.lookup(req)
    assert isinstance(hit, CachedResponse)
    assert hit.response == answer(req)
    assert (hit.key, hit.model, hit.tags, hit.tenant) == (key, "gpt-4o-mini", frozenset({"math"}), "default")
    assert hit.created == T0 and hit.age(T0 + 5) == 5
    assert hit.hits == 1
    assert cache.lookup(req).hits == 2  # type: ignore[union-attr]
    snap = cache.metrics.snapshot()["layers"]["exact"]
    assert (snap["hits"], snap["misses"]) == (2, 1)
    assert snap["tokens_saved"] == {"input": 20, "output": 10}
    # gpt-4o-mini at 0.15 / 0.60 USD per 1M tokens, two hits of 10 + 5 tokens.
    assert snap["cost_saved_usd"] == pytest.approx(2 * (10 * 0.15 + 5 * 0.60) / 1e6)


def test_key_is_request_key_with_tenant_salt_and_revision(store: Store, clock: ManualClock) -> None:
    cache = ExactCache(store, clock=clock, key_secret=b"s3cret", model_revisions={"gpt-4o-mini": "r2"})
    req = chat("hi")
    expected = request_key(
        req, tenant_salt=tenant_salt("acme", b"s3cret"), endpoint="completions", model_revision="r2"
    )
    assert cache.key_for(req, tenant="acme", endpoint="completions") == expected


def test_tenants_never_share_entries(cache: ExactCache) -> None:
    req = chat("secret plan")
    cache.store(req, answer(req), tenant="acme")
    assert cache.lookup(req, tenant="globex") is None
    assert cache.lookup(req, tenant="acme") is not None
    assert cache.key_for(req, tenant="acme") != cache.key_for(req, tenant="globex")


def test_answer_changing_fields_miss_and_ignored_fields_hit(cache: ExactCache) -> None:
    req = chat("hi")
    cache.store(req, answer(req))
    assert cache.lookup(chat("hi", max_tokens=5)) is None
    assert cache.lookup(chat("hi", model="gpt-4o")) is None
    assert cache.lookup({**req, "stream": True, "user": "someone"}) is not None


def test_sampled_requests_are_neither_served_nor_stored_unless_allowed(cache: ExactCache) -> None:
    sampled = {"model": "m", "messages": [{"role": "user", "content": "poem"}]}  # temperature absent: 1
    assert cache.store(sampled, answer(sampled)) is None
    assert len(cache.backend) == 0
    key = cache.store(sampled, answer(sampled), allow_sampled=True)
    assert key is not None
    assert cache.lookup(sampled) is None
    assert cache.lookup(sampled, allow_sampled=True) is not None
    hot = {**sampled, "temperature": 0.7}
    calls: list[int] = []
    for _ in range(2):
        _, hit = cache.get_or_compute(hot, lambda: calls.append(1) or answer(hot))
        assert not hit
    assert len(calls) == 2  # recomputed each time
    assert cache.metrics.count("bypass", reason="sampled") >= 4


@pytest.mark.parametrize(
    "response",
    [
        {"error": {"message": "rate limited"}},
        {"choices": []},
        {"choices": [{"index": 0, "message": {"content": "cut"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "error"}]},
        {"choices": [{"index": 0, "message": {"content": "partly"}, "finish_reason": "content_filter"}]},
        "not a dict",
    ],
)
def test_error_and_incomplete_answers_are_not_stored(cache: ExactCache, response: Any) -> None:
    req = chat("q")
    assert cache.store(req, response) is None
    assert len(cache.backend) == 0
    assert not cacheable_response(response, "chat.completions")


def test_embeddings_and_other_endpoints_are_cacheable_by_shape() -> None:
    assert cacheable_response({"data": [{"embedding": [0.1]}]}, "embeddings")
    assert not cacheable_response({"data": []}, "embeddings")
    assert cacheable_response({"anything": 1}, "langchain")


def test_ttl_default_and_per_call(store: Store, clock: ManualClock) -> None:
    cache = ExactCache(store, clock=clock, default_ttl=6000)
    a, b = chat("a"), chat("b")
    cache.store(a, answer(a))
    cache.store(b, answer(b), ttl=1000)
    clock.advance(1000)
    assert cache.lookup(b) is None
    assert cache.lookup(a) is not None
    clock.advance(5000)
    assert cache.lookup(a) is None


def test_the_store_clock_stamps_entries_by_default(store: Store, clock: ManualClock) -> None:
    cache = ExactCache(store, default_ttl=5000)  # no clock given: the store's ManualClock
    req = chat("when?")
    cache.store(req, answer(req))
    hit = cache.lookup(req)
    assert hit is not None and (hit.created, hit.expires) == (T0, T0 + 5000)
    clock.advance(5000)
    assert cache.lookup(req) is None


def test_a_corrupt_value_reads_as_a_miss_and_is_dropped(cache: ExactCache) -> None:
    req = chat("q")
    key = cache.key_for(req)
    cache.backend.put(Record(key=key, value=b"\xff not json", created=T0))
    assert cache.lookup(req) is None
    assert cache.metrics.count("errors", kind="decode") == 1
    assert cache.backend.peek(key) is None
    response, hit = cache.get_or_compute(req, lambda: answer(req))
    assert not hit and response == answer(req)
    assert cache.lookup(req) is not None


def test_bad_arguments_raise_config_errors(cache: ExactCache, store: Store) -> None:
    with pytest.raises(ConfigError, match="`store`"):
        ExactCache({})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`default_ttl`"):
        ExactCache(store, default_ttl=0)
    with pytest.raises(ConfigError, match="`ttl`"):
        cache.store(chat("q"), answer(chat("q")), ttl=-1)
    with pytest.raises(ConfigError, match="`tenant`"):
        cache.lookup(chat("q"), tenant="")
    with pytest.raises(ConfigError, match="`tags`"):
        cache.store(chat("q"), answer(chat("q")), tags="faq")
    with pytest.raises(ConfigError, match="`request`"):
        cache.lookup(["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`response`"):
        cache.store(chat("q"), {**answer(chat("q")), "x": float("nan")})


def test_a_dead_backend_is_a_miss_and_an_error_count_not_a_failure(clock: ManualClock) -> None:
    # A real Redis client pointed at a port where nothing listens: every command fails fast.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.2, clock=clock)
    cache = ExactCache(dead, clock=clock)
    req = chat("q")
    assert cache.lookup(req) is None
    assert cache.store(req, answer(req)) is None
    response, hit = cache.get_or_compute(req, lambda: answer(req))
    assert (response, hit) == (answer(req), False)
    assert cache.metrics.count("errors", layer="exact", kind="backend") == 5  # 2 gets, 1 recheck, 2 puts
    with pytest.raises(BackendError):
        cache.invalidate_tag("faq")  # administrative calls must report that they did not happen


# -- get_or_compute and single-flight ---------------------------------------------------------------------


def test_get_or_compute_reuse_equals_recompute(cache: ExactCache) -> None:
    calls: list[str] = []

    def model(req: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        def compute() -> dict[str, Any]:
            calls.append(req["messages"][-1]["content"])
            return answer(req)

        return compute

    seen: set[str] = set()
    for p in ["a", "b", "a", "c", "b", "a"]:
        req = chat(p)
        response, hit = cache.get_or_compute(req, model(req))
        assert response == answer(req)  # what a fresh computation returns
        assert hit == (p in seen)
        seen.add(p)
    assert calls == ["a", "b", "c"]


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def test_concurrent_identical_misses_compute_once(cache: ExactCache) -> None:
    req = chat("slow question")
    key = cache.key_for(req)
    release = threading.Event()
    calls: list[int] = []
    results: list[tuple[dict[str, Any], bool]] = []
    num_threads = 6

    def compute() -> dict[str, Any]:
        calls.append(1)
        release.wait(10)
        return answer(req)

    def worker() -> None:
        results.append(cache.get_or_compute(req, compute))

    threads = [threading.Thread(target=worker) for _ in range(num_threads)]
    for t in threads:
        t.start()
    # The leader holds the flight until every other thread waits on it: all of them missed.
    _wait_until(lambda: cache._flights.waiting(key) == num_threads - 1)
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert [r for r, _ in results] == [answer(req)] * num_threads
    assert sorted(hit for _, hit in results) == [False] + [True] * (num_threads - 1)
    assert cache.metrics.count("coalesced") == num_threads - 1
    assert cache.lookup(req) is not None


def test_threads_over_many_keys_compute_each_key_exactly_once(cache: ExactCache) -> None:
    # Misses racing with landings: the re-check inside a flight catches an answer stored a moment ago.
    computed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(40):
                question = f"q{(i * 7 + seed) % 10}"
                req = chat(question)

                def compute(question: str = question, req: dict[str, Any] = req) -> dict[str, Any]:
                    with lock:
                        computed.append(question)
                    time.sleep(0.002)
                    return answer(req)

                response, _ = cache.get_or_compute(req, compute)
                assert response == answer(req)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(computed) == [f"q{i}" for i in range(10)]


def test_a_failing_compute_is_not_cached_and_reaches_every_waiter(cache: ExactCache) -> None:
    req = chat("boom")
    key = cache.key_for(req)
    release = threading.Event()
    errors: list[BaseException] = []

    def compute() -> dict[str, Any]:
        release.wait(10)
        raise RuntimeError("upstream 503")

    def worker() -> None:
        try:
            cache.get_or_compute(req, compute)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    _wait_until(lambda: cache._flights.waiting(key) == 3)
    release.set()
    for t in threads:
        t.join(10)
    assert [str(e) for e in errors] == ["upstream 503"] * 4
    assert cache.lookup(req) is None
    response, hit = cache.get_or_compute(req, lambda: answer(req))
    assert (response, hit) == (answer(req), False)


async def test_async_concurrent_identical_misses_compute_once(cache: ExactCache) -> None:
    req = chat("async question")
    calls: list[int] = []

    async def acompute() -> dict[str, Any]:
        calls.append(1)
        await asyncio.sleep(0.05)
        return answer(req)

    results = await asyncio.gather(*(cache.aget_or_compute(req, acompute) for _ in range(8)))
    assert len(calls) == 1
    assert [r for r, _ in results] == [answer(req)] * 8
    assert sorted(h for _, h in results) == [False] + [True] * 7
    response, hit = await cache.aget_or_compute(req, acompute)
    assert hit and response == answer(req) and len(calls) == 1


async def test_async_failing_compute_is_not_cached(cache: ExactCache) -> None:
    req = chat("async boom")

    async def acompute() -> dict[str, Any]:
        await asyncio.sleep(0.01)
        raise RuntimeError("cut")

    outcomes = await asyncio.gather(
        *(cache.aget_or_compute(req, acompute) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert cache.lookup(req) is None


# -- invalidation and erasure -----------------------------------------------------------------------------


def _fill(cache: ExactCache, clock: ManualClock) -> dict[str, str]:
    """Six entries across tenants, users, tags and models, stored 10 s apart."""
    keys: dict[str, str] = {}
    spec = [
        ("a1", "acme", "ann", ["faq"], "gpt-4o-mini"),
        ("a2", "acme", "bob", ["faq", "billing"], "gpt-4o"),
        ("a3", "acme", "ann", [], "gpt-4o"),
        ("g1", "globex", "ann", ["faq"], "gpt-4o-mini"),
        ("g2", "globex", "cid", ["billing"], "gpt-4o"),
        ("d1", "default", "", [], "gpt-4o-mini"),
    ]
    for name, tenant, user, tags, model in spec:
        req = chat(name, model=model)
        key = cache.store(req, answer(req), tenant=tenant, user=user, tags=tags)
        assert key is not None
        keys[name] = key
        clock.advance(10)
    return keys


def _left(cache: ExactCache, keys: dict[str, str]) -> set[str]:
    live = {r.key for r in cache.backend.scan()}
    return {name for name, key in keys.items() if key in live}


def test_invalidate_by_key_tag_and_model(cache: ExactCache, clock: ManualClock) -> None:
    keys = _fill(cache, clock)
    assert cache.invalidate(keys["d1"]) is True
    assert cache.invalidate(keys["d1"]) is False
    assert cache.invalidate_tag("faq", tenant="acme") == 2
    assert _left(cache, keys) == {"a3", "g1", "g2"}
    assert cache.invalidate_tag("billing") == 1
    assert cache.invalidate_model("gpt-4o-mini") == 1
    assert _left(cache, keys) == {"a3"}


def test_model_revision_change_misses_old_entries_and_purges_them(
    cache: ExactCache, clock: ManualClock
) -> None:
    keys = _fill(cache, clock)
    old_key = cache.key_for(chat("a3", model="gpt-4o"), tenant="acme")
    assert cache.set_model_revision("gpt-4o", "2025-01") == 3
    assert _left(cache, keys) == {"a1", "g1", "d1"}
    new_key = cache.key_for(chat("a3", model="gpt-4o"), tenant="acme")
    assert new_key != old_key
    assert cache.lookup(chat("a1"), tenant="acme") is not None  # other models untouched


@pytest.mark.parametrize(
    ("filters", "left"),
    [
        ({"tenant": "acme"}, {"g1", "g2", "d1"}),
        ({"user": "ann"}, {"a2", "g2", "d1"}),
        ({"tenant": "acme", "user": "ann"}, {"a2", "g1", "g2", "d1"}),
        ({"tag": "billing"}, {"a1", "a3", "g1", "d1"}),
        ({"model": "gpt-4o", "tenant": "globex"}, {"a1", "a2", "a3", "g1", "d1"}),
        ({"older_than": 35}, {"g1", "g2", "d1"}),  # now = T0 + 60; a1..a3 were stored at +0, +10, +20
        ({"older_than": 35, "tag": "faq"}, {"a3", "g1", "g2", "d1"}),
    ],
)
def test_purge_by_filters(
    cache: ExactCache, clock: ManualClock, filters: dict[str, Any], left: set[str]
) -> None:
    keys = _fill(cache, clock)
    purged = cache.purge(**filters)
    assert _left(cache, keys) == left
    assert purged == 6 - len(left)


def test_purge_needs_a_filter_and_valid_age(cache: ExactCache) -> None:
    with pytest.raises(ConfigError, match="at least one filter"):
        cache.purge()
    with pytest.raises(ConfigError, match="`older_than`"):
        cache.purge(older_than=-1)


def test_erase_user_and_tenant(cache: ExactCache, clock: ManualClock) -> None:
    keys = _fill(cache, clock)
    assert cache.erase_user("acme", "ann") == 2
    assert _left(cache, keys) == {"a2", "g1", "g2", "d1"}
    assert cache.erase_tenant("globex") == 2
    assert _left(cache, keys) == {"a2", "d1"}
    with pytest.raises(ConfigError, match="`user`"):
        cache.erase_user("acme", "")


# -- export / import --------------------------------------------------------------------------------------


def _records(store: Store) -> dict[str, tuple[Any, ...]]:
    return {r.key: (r.value, r.tenant, r.user, r.tags, r.model, r.created, r.expires) for r in store.scan()}


def test_export_import_round_trip(cache: ExactCache, clock: ManualClock) -> None:
    _fill(cache, clock)
    cache.backend.put(Record(key="raw", value=b"\x00\x01binary", created=T0))
    out = io.StringIO()
    assert cache.export_jsonl(out) == 7
    lines = out.getvalue().splitlines()
    assert all(json.loads(line)["key"] for line in lines)
    target = ExactCache(MemoryStore(clock=clock), clock=clock)
    assert target.import_jsonl(io.StringIO(out.getvalue())) == 7
    assert _records(target.backend) == _records(cache.backend)
    # Exported answers are served by the target cache.
    hit = target.lookup(chat("a1"), tenant="acme")
    assert hit is not None and hit.response == answer(chat("a1"))


def test_export_with_a_filter(cache: ExactCache, clock: ManualClock) -> None:
    _fill(cache, clock)
    out = io.StringIO()
    assert cache.export_jsonl(out, where=Match(tenant="globex")) == 2
    assert {json.loads(line)["tenant"] for line in out.getvalue().splitlines()} == {"globex"}


def test_seed_lines_pre_seed_a_static_cache(cache: ExactCache) -> None:
    faq = [chat("opening hours?"), chat("refund policy?")]
    seed = "\n".join(
        json.dumps({"request": r, "response": answer(r), "tags": ["faq"], "tenant": "acme"}) for r in faq
    )
    assert cache.import_jsonl(io.StringIO(seed + "\n\n")) == 2
    for r in faq:
        hit = cache.lookup(r, tenant="acme")
        assert hit is not None and hit.response == answer(r) and hit.tags == {"faq"}


def test_import_reports_bad_lines_and_writes_nothing(cache: ExactCache) -> None:
    good = json.dumps({"request": chat("ok"), "response": answer(chat("ok"))})
    sampled = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    lines = [
        good,
        "{not json",
        json.dumps({"key": "k", "created": "yesterday", "response": {}}),
        json.dumps({"request": sampled, "response": answer(sampled)}),
        json.dumps({"key": "k", "created": 1.0, "response": {}, "colour": "red"}),
        json.dumps([1, 2]),
        json.dumps({"request": chat("x"), "response": {"error": "boom"}}),
    ]
    with pytest.raises(ConfigError) as info:
        cache.import_jsonl(io.StringIO("\n".join(lines)))
    message = str(info.value)
    assert "line 2: not valid JSON" in message
    assert "line 3: `created` must be a number, got 'yesterday'" in message
    assert "line 4: `request` samples" in message
    assert "line 5: unknown field `colour`" in message
    assert "line 6: expected a JSON object" in message
    assert "(and 1 more)" in message and "nothing was imported" in message
    assert len(cache.backend) == 0


def test_import_skips_expired_entries(cache: ExactCache, clock: ManualClock) -> None:
    line = {"key": "k1", "created": T0 - 100, "expires": T0 - 1, "response": {"a": 1}}
    live = {"key": "k2", "created": T0 - 100, "expires": T0 + 10_000, "response": {"a": 2}}
    assert cache.import_jsonl(io.StringIO(json.dumps(line) + "\n" + json.dumps(live))) == 1
    assert cache.backend.peek("k1") is None and cache.backend.peek("k2") is not None


# -- property: reuse equals recompute, and hits happen exactly when a live entry exists ---------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), st.integers(0, 5), st.sampled_from(["acme", "globex"])),
        st.tuples(st.just("invalidate_tag"), st.sampled_from(["even", "odd"]), st.none()),
        st.tuples(st.just("erase_tenant"), st.sampled_from(["acme", "globex"]), st.none()),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 5.0, 30.0]), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_reuse_equals_recompute_against_a_dict_model(ops: list[tuple[str, Any, Any]]) -> None:
    clock = ManualClock(T0)
    cache = ExactCache(MemoryStore(clock=clock), clock=clock, default_ttl=20)
    model: dict[tuple[int, str], tuple[float, str]] = {}  # (question, tenant) → (expires, tag)
    computed: list[int] = []
    for op, arg, tenant in ops:
        if op == "ask":
            req = chat(f"question {arg}")
            tag = "even" if arg % 2 == 0 else "odd"

            def compute(req: dict[str, Any] = req, arg: int = arg) -> dict[str, Any]:
                computed.append(arg)
                return answer(req)

            live = (arg, tenant) in model and model[(arg, tenant)][0] > clock()
            response, hit = cache.get_or_compute(req, compute, tenant=tenant, tags=[tag])
            assert response == answer(req)  # a reused answer is exactly the recomputed one
            assert hit == live
            if not hit:
                model[(arg, tenant)] = (clock() + 20, tag)
        elif op == "invalidate_tag":
            cache.invalidate_tag(arg)
            model = {k: v for k, v in model.items() if v[1] != arg}
        elif op == "erase_tenant":
            cache.erase_tenant(arg)
            model = {k: v for k, v in model.items() if k[1] != arg}
        else:
            clock.advance(arg)
    misses = sum(1 for op, *_ in ops if op == "ask") - cache.metrics.count("hits", layer="exact")
    assert len(computed) == misses


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_RECORDS = st.lists(
    st.builds(
        Record,
        key=st.text("0123456789abcdef", min_size=8, max_size=8),
        value=st.one_of(
            st.recursive(
                st.none() | st.booleans() | st.integers() | _TEXT,
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                max_leaves=8,
            ).map(lambda v: json.dumps({"v": v}, separators=(",", ":"), ensure_ascii=False).encode()),
            st.binary(max_size=16),
        ),
        tenant=st.sampled_from(["default", "acme", "ünï"]),
        user=_TEXT,
        tags=st.frozensets(_TEXT.filter(bool), max_size=3),
        model=_TEXT,
        created=st.floats(T0 - 1e6, T0, allow_nan=False),
        hits=st.integers(0, 10),
    ),
    max_size=8,
    unique_by=lambda r: r.key,
)


@settings(max_examples=60, deadline=None)
@given(records=_RECORDS)
def test_export_import_restores_every_record_byte_for_byte(records: list[Record]) -> None:
    source = ExactCache(MemoryStore())
    for record in records:
        source.backend.put(record)
    dump = io.StringIO()
    assert source.export_jsonl(dump) == len(records)
    target = ExactCache(MemoryStore())
    assert target.import_jsonl(io.StringIO(dump.getvalue())) == len(records)
    assert {r.key: r for r in target.backend.scan()} == {r.key: r for r in records}
