"""Fuzzing the proxy against its own OpenAPI document: no request, valid or not, gets a 5xx.

Bodies come from the request schemas of ``/openapi.json`` (turned into hypothesis strategies by
`from_schema` below, for the JSON-Schema subset the document uses; hypothesis-jsonschema does not run on
this hypothesis version), mutated by dropping or retyping fields, from arbitrary JSON, and from raw bytes;
cache-control headers from their schemas plus arbitrary text. Over 1,000 cases in all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachelm.server.config import ServerConfig
from cachelm.server.openapi import openapi_document
from cachelm.server.testing import ProxyThread
from tests.upstream import OpenAIUpstream

pytestmark = pytest.mark.slow

DOCUMENT = openapi_document()


def fuzz(cases: int) -> settings:
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under `schema` (types, enum, anyOf, properties/required, sizes, bounds, pattern)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        properties = {name: from_schema(sub) for name, sub in schema.get("properties", {}).items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: v for k, v in properties.items() if k in required},
            optional={k: v for k, v in properties.items() if k not in required},
        )
    if kind == "array":
        items = from_schema(schema.get("items", {"type": "string"}))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind in ("number", "integer"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if kind == "integer":
            return st.integers(min_value=low, max_value=high)
        return st.floats(
            min_value=low, max_value=high, allow_nan=False, allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
        )  # fmt: skip
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


def mutated(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Schema-valid bodies, half of them with one field dropped or replaced by an arbitrary value."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        body = dict(draw(valid))
        if body and draw(st.booleans()):
            field = draw(st.sampled_from(sorted(body)))
            if draw(st.booleans()):
                del body[field]
            else:
                body[field] = draw(JSON_VALUES)
        return body

    return build()


def body_schema(path: str) -> dict[str, Any]:
    schema: dict[str, Any] = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    return schema


def _header_value(value: str) -> str:
    return "".join(ch for ch in value if 32 <= ord(ch) < 127).strip() or "x"


def headers_strategy(path: str) -> st.SearchStrategy[dict[str, str]]:
    """Cache-control headers: schema-valid values or arbitrary printable text, each present or not."""
    parameters = DOCUMENT["paths"][path]["post"]["parameters"]
    # HTTP/1.1 header values are printable ASCII without surrounding whitespace; anything else is refused
    # by the client library (or by the server's HTTP parser) before it could reach the app.
    entries = {
        p["name"]: st.one_of(from_schema(p["schema"]).map(str), HEADER_TEXT).map(_header_value)
        for p in parameters
    }
    return st.fixed_dictionaries({}, optional=entries)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with OpenAIUpstream() as base_url:
        config = ServerConfig(
            upstream=base_url,
            store_url=f"sqlite:///{tmp}/cache.db",
            access_log=False,
            max_body_bytes=256 * 1024,
        )
        with ProxyThread(config) as server:
            yield server.url


@pytest.fixture(scope="module")
def http(proxy: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy, timeout=5) as client:
        yield client


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:  # every refusal explains itself in the OpenAI error shape
        assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "cases"), [("/v1/chat/completions", 350), ("/v1/completions", 250), ("/v1/embeddings", 200)]
)
def test_schema_generated_requests_never_5xx(http: httpx.Client, path: str, cases: int) -> None:
    @fuzz(cases)
    @given(body=mutated(from_schema(body_schema(path))), headers=headers_strategy(path))
    def run(body: dict[str, Any], headers: dict[str, str]) -> None:
        sent.append(1)
        check(http.post(path, json=body, headers=headers))

    sent: list[int] = []
    run()
    assert len(sent) >= cases  # the case count is real, not an upper bound hypothesis stopped short of


@fuzz(150)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), body=JSON_VALUES)
def test_arbitrary_json_never_5xx(http: httpx.Client, path: str, body: Any) -> None:
    check(http.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@fuzz(100)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]), raw=st.binary(max_size=64))
def test_raw_bytes_never_5xx(http: httpx.Client, path: str, raw: bytes) -> None:
    response = http.post(path, content=raw)
    assert 400 <= response.status_code < 500
