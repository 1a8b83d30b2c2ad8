"""Property tests for cachelm.keys: request keys and chained KV block hashes."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cachelm.errors import ConfigError
from cachelm.keys import (
    ANSWER_CHANGING_FIELDS,
    DEFAULTS,
    IGNORED_FIELDS,
    ModelFingerprint,
    canonical_request,
    chain_block_hashes,
    request_key,
    semantic_query,
    tenant_salt,
)

SALT = tenant_salt("acme")

# JSON-like values; floats are finite (non-finite numbers are rejected, tested separately).
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
)
JSON = st.recursive(
    SCALARS | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}
    ),
    min_size=1,
    max_size=4,
)
REQUESTS = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-a", "gpt-b"]), "messages": MESSAGES},
    optional={
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 4096),
        "seed": st.integers(0, 2**31),
        "stop": st.lists(st.text(max_size=4), max_size=2),
        "top_p": st.floats(0, 1),
        "logit_bias": st.dictionaries(st.integers(0, 1000).map(str), st.integers(-100, 100), max_size=3),
    },
)


def key(request: dict[str, Any], **kw: Any) -> str:
    kw.setdefault("tenant_salt", SALT)
    return request_key(request, **kw)


def shuffled(value: Any, rng: random.Random) -> Any:
    """`value` with every dict's insertion order shuffled (recursively)."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


def floats_for_ints(value: Any) -> Any:
    """Integers written as floats (1 → 1.0), recursively; booleans stay booleans."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) < 2**53:
        return float(value)
    if isinstance(value, dict):
        return {k: floats_for_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [floats_for_ints(v) for v in value]
    return value


# -- equal requests, equal keys ----------------------------------------------------------------------------


@settings(max_examples=100)
@given(request=REQUESTS, seed=st.integers())
def test_dict_order_does_not_matter(request: dict[str, Any], seed: int) -> None:
    assert key(shuffled(request, random.Random(seed))) == key(request)


@settings(max_examples=100)
@given(request=REQUESTS)
def test_number_formatting_does_not_matter(request: dict[str, Any]) -> None:
    assert key(floats_for_ints(request)) == key(request)


def test_one_and_one_point_zero_are_the_same_but_true_is_not() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert key({**base, "max_tokens": 100}) == key({**base, "max_tokens": 100.0})
    assert key({**base, "seed": 1}) == key({**base, "seed": 1e0})
    assert key({**base, "logprobs": True}) != key({**base, "logprobs": 1})


@settings(max_examples=100)
@given(
    request=REQUESTS,
    ignored=st.dictionaries(st.sampled_from(sorted(IGNORED_FIELDS)), JSON, min_size=1),
)
def test_ignored_fields_do_not_matter(request: dict[str, Any], ignored: dict[str, Any]) -> None:
    assert key({**request, **ignored}) == key(request)


@settings(max_examples=50)
@given(request=REQUESTS, defaults=st.lists(st.sampled_from(sorted(DEFAULTS)), min_size=1, unique=True))
def test_explicit_defaults_and_nones_do_not_matter(request: dict[str, Any], defaults: list[str]) -> None:
    bare = {k: v for k, v in request.items() if k not in DEFAULTS}
    explicit = {**bare, **{name: DEFAULTS[name] for name in defaults}, "stop": None, "seed": None}
    assert key(explicit) == key({k: v for k, v in bare.items() if k not in ("stop", "seed")})
    # A default written as a float (temperature 1.0, top_p 1.0) is still the default.
    assert key({**bare, **{n: floats_for_ints(DEFAULTS[n]) for n in defaults}}) == key(bare)


# -- every answer-changing field changes the key -----------------------------------------------------------


def _distinct(a: Any, b: Any) -> bool:
    return canonical_request({"f": a}) != canonical_request({"f": b})


@settings(max_examples=300)
@given(field=st.sampled_from(ANSWER_CHANGING_FIELDS), a=JSON, b=JSON)
def test_every_answer_changing_field_changes_the_key(field: str, a: Any, b: Any) -> None:
    base = {"model": "m0", "messages": [{"role": "user", "content": "hello"}]}
    assume(_distinct(a, b))
    # Neither value may be "absent" in disguise (None, or the field's documented default).
    for value in (a, b):
        assume(value is not None and canonical_request({field: value}) != {})
    assert key({**base, field: a}) != key({**base, field: b})
    assert key({**base, field: a}) != key({k: v for k, v in base.items() if k != field})


def test_answer_changing_fields_are_not_ignored() -> None:
    assert not set(ANSWER_CHANGING_FIELDS) & IGNORED_FIELDS


@settings(max_examples=50)
@given(request=REQUESTS, name=st.text(min_size=1, max_size=12), value=JSON)
def test_unknown_fields_change_the_key(request: dict[str, Any], name: str, value: Any) -> None:
    assume(name not in request and name not in IGNORED_FIELDS and name not in DEFAULTS and value is not None)
    assert key({**request, name: value}) != key(request)


def test_whitespace_in_text_is_significant() -> None:
    one = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}
    two = {"model": "m", "messages": [{"role": "user", "content": "hi  there"}]}
    assert key(one) != key(two)


# -- tenant, endpoint, revision ----------------------------------------------------------------------------


@settings(max_examples=50)
@given(request=REQUESTS, a=st.text(min_size=1, max_size=8), b=st.text(min_size=1, max_size=8))
def test_different_tenants_get_different_keys(request: dict[str, Any], a: str, b: str) -> None:
    assume(a != b)
    assert key(request, tenant_salt=tenant_salt(a)) != key(request, tenant_salt=tenant_salt(b))


def test_salt_secret_endpoint_and_revision_change_the_key() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    keys = {
        key(request),
        key(request, tenant_salt=tenant_salt("acme", secret=b"server secret")),
        key(request, endpoint="completions"),
        key(request, model_revision="rev2"),
    }
    assert len(keys) == 4
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


def test_keys_never_contain_the_text() -> None:
    secret = "my password is hunter2"
    k = key({"model": "m", "messages": [{"role": "user", "content": secret}]})
    assert "hunter2" not in k and len(k) == 64


def test_invalid_requests_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="finite"):
        key({"model": "m", "temperature": float("nan")})
    with pytest.raises(ConfigError, match="keys must be strings"):
        key({"model": "m", "logit_bias": {1: 5}})
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        key({"model": "m", "messages": object()})
    with pytest.raises(ConfigError, match="mapping"):
        request_key(["not", "a", "mapping"], tenant_salt=SALT)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tenant_id"):
        tenant_salt("")


def test_lone_surrogates_in_text_are_keyed_not_crashing() -> None:
    # json.loads('"\\ud800"') yields a lone surrogate; a proxy must still key such a request.
    a = key({"model": "m", "messages": [{"role": "user", "content": "\ud800"}]})
    b = key({"model": "m", "messages": [{"role": "user", "content": "\ud801"}]})
    assert a != b


# -- semantic split ----------------------------------------------------------------------------------------


def test_semantic_context_key_ignores_the_last_user_turn_only() -> None:
    def req(system: str, last: str) -> dict[str, Any]:
        return {
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": last}],
        }

    a = semantic_query(req("be brief", "what is 2+2?"), tenant_salt=SALT)
    b = semantic_query(req("be brief", "tell me two plus two"), tenant_salt=SALT)
    c = semantic_query(req("be verbose", "what is 2+2?"), tenant_salt=SALT)
    assert a is not None and b is not None and c is not None
    assert a.text == "what is 2+2?" and a.context_key == b.context_key != c.context_key
    other_tenant = semantic_query(req("be brief", "what is 2+2?"), tenant_salt=tenant_salt("other"))
    assert other_tenant is not None and other_tenant.context_key != a.context_key
    assistant_last = {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}
    assert semantic_query(assistant_last, tenant_salt=SALT) is None


# -- chained KV block hashes -------------------------------------------------------------------------------

MODEL = ModelFingerprint(model_id="llama", revision="r1", dtype="bfloat16")
TOKENS = st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=80)
BLOCK = st.integers(1, 16)


def chain(tokens: list[int], block: int, **kw: Any) -> list[bytes]:
    kw.setdefault("model", MODEL)
    kw.setdefault("tenant_salt", SALT)
    return list(chain_block_hashes(tokens, block, **kw))


@given(tokens=TOKENS, block=BLOCK)
def test_one_hash_per_full_block(tokens: list[int], block: int) -> None:
    hashes = chain(tokens, block)
    assert len(hashes) == len(tokens) // block
    assert len(set(hashes)) == len(hashes)  # chaining: even equal blocks hash differently by position
    assert all(len(h) == 32 for h in hashes)


@given(prefix=TOKENS, a=TOKENS, b=TOKENS, block=BLOCK)
def test_equal_prefixes_share_hashes(prefix: list[int], a: list[int], b: list[int], block: int) -> None:
    full = len(prefix) // block * block  # the shared part that fills whole blocks
    ha, hb = chain(prefix + a, block), chain(prefix + b, block)
    n = full // block
    assert ha[:n] == hb[:n]


@given(tokens=TOKENS, block=BLOCK, data=st.data())
def test_change_in_block_i_changes_hashes_from_i_on(
    tokens: list[int], block: int, data: st.DataObject
) -> None:
    n = len(tokens) // block
    assume(n >= 1)
    i = data.draw(st.integers(0, n - 1), label="block")
    pos = data.draw(st.integers(i * block, (i + 1) * block - 1), label="position")
    changed = list(tokens)
    changed[pos] = (changed[pos] + 1) % 2**31
    before, after = chain(tokens, block), chain(changed, block)
    assert before[:i] == after[:i]
    assert all(x != y for x, y in zip(before[i:], after[i:], strict=True))


@given(tokens=TOKENS, block=BLOCK)
def test_tail_tokens_beyond_the_last_full_block_do_not_matter(tokens: list[int], block: int) -> None:
    n = len(tokens) // block
    assert chain(tokens, block) == chain(tokens[: n * block], block)


@pytest.mark.parametrize(
    "other",
    [
        {"model": ModelFingerprint(model_id="llama", revision="r2", dtype="bfloat16")},
        {"model": ModelFingerprint(model_id="llama", revision="r1", dtype="float16")},
        {"model": ModelFingerprint(model_id="qwen", revision="r1", dtype="bfloat16")},
        {"tenant_salt": tenant_salt("other")},
    ],
    ids=["revision", "dtype", "model", "tenant"],
)
def test_model_or_tenant_change_changes_every_hash(other: dict[str, Any]) -> None:
    tokens = list(range(64))
    base, changed = chain(tokens, 8), chain(tokens, 8, **other)
    assert len(base) == 8 and all(x != y for x, y in zip(base, changed, strict=True))


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        chain([1, 2, 3], 0)


def test_semantic_context_key_keeps_non_text_parts_of_the_last_turn() -> None:
    def req(url: str) -> dict[str, Any]:
        parts = [
            {"type": "text", "text": "what is in this image?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
        return {"model": "m", "messages": [{"role": "user", "content": parts}]}

    cat = semantic_query(req("https://example.com/cat.png"), tenant_salt=SALT)
    dog = semantic_query(req("https://example.com/dog.png"), tenant_salt=SALT)
    assert cat is not None and dog is not None and cat.text == dog.text
    assert cat.context_key != dog.context_key


def test_deeply_nested_request_is_a_config_error_not_a_recursion_error() -> None:
    nested: list[Any] = []
    inner = nested
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(ConfigError, match="nests deeper than"):
        request_key({"model": "m", "messages": nested}, tenant_salt=SALT)
