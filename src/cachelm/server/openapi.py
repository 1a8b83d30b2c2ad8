"""The proxy's OpenAPI 3.1 document (served at ``/openapi.json``; the fuzz tests generate requests from it).

Written by hand because the app validates bodies by hand (see `app.py`). The schemas describe what the
proxy accepts; the upstream may still refuse a well-formed request (its 4xx is passed through).
"""

from __future__ import annotations

from typing import Any

from cachelm import __version__

_CACHE = {
    "type": "object",
    "description": "cachelm cache control (never part of the key, never sent upstream).",
    "properties": {
        "bypass": {"type": "boolean"},
        "refresh": {"type": "boolean"},
        "ttl": {"type": "number", "exclusiveMinimum": 0},
        "semantic": {"type": "boolean"},
        "delta": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "sampled": {"type": "boolean"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 64},
            "maxItems": 16,
        },
    },
    "additionalProperties": False,
}

_COMMON = {
    "model": {"type": "string", "minLength": 1, "maxLength": 256},
    "stream": {"type": "boolean"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 128},
    "max_tokens": {"type": "integer", "minimum": 1},
    "seed": {"type": "integer"},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "user": {"type": "string", "maxLength": 256},
    "cache": _CACHE,
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
        "content": {
            "anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {"type": "object"}}]
        },
        "name": {"type": "string"},
    },
}

CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {**_COMMON, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1}},
}
COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
        },
    },
}
EMBEDDING_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _COMMON["model"],
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2048},
            ]
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1, "maximum": 16384},
        "user": _COMMON["user"],
        "cache": _CACHE,
    },
}

_ERROR = {"description": 'An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}'}
_CACHE_HEADERS = [
    {"name": name, "in": "header", "required": False, "schema": schema}
    for name, schema in (
        ("x-cachelm-bypass", {"enum": ["on", "off", "true", "false", "1", "0"]}),
        ("x-cachelm-refresh", {"enum": ["on", "off", "true", "false", "1", "0"]}),
        ("x-cachelm-semantic", {"enum": ["on", "off"]}),
        ("x-cachelm-sampled", {"enum": ["on", "off"]}),
        ("x-cachelm-ttl", {"type": "string", "pattern": "^[0-9]{1,6}(\\.[0-9]{1,3})?$"}),
        ("x-cachelm-delta", {"type": "string", "pattern": "^0\\.[0-9]{1,4}$"}),
        ("x-cachelm-tags", {"type": "string", "maxLength": 200}),
        ("x-cachelm-user", {"type": "string", "maxLength": 256}),
    )
]


def _post(summary: str, schema: dict[str, Any], streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {}}
    if streams:
        content["text/event-stream"] = {}
    return {
        "post": {
            "summary": summary,
            "parameters": _CACHE_HEADERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {
                    "description": "Answer; x-cachelm-cache: hit|semantic-hit|miss|bypass; x-cachelm-age",
                    "content": content,
                },
                "400": _ERROR,
                "401": _ERROR,
                "413": _ERROR,
                "502": _ERROR,
                "504": _ERROR,
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "cachelm caching proxy", "version": __version__},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": _post("Chat completion through the cache", CHAT_REQUEST, True),
            "/v1/completions": _post("Text completion through the cache", COMPLETION_REQUEST, True),
            "/v1/embeddings": _post("Embeddings through the embedding cache", EMBEDDING_REQUEST, False),
            "/v1/models": {
                "get": {"summary": "Models of the upstream", "responses": {"200": {"description": "list"}}}
            },
            "/healthz": {
                "get": {"summary": "Health", "responses": {"200": {"description": "ok or degraded"}}}
            },
            "/metrics": {
                "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}
            },
        },
    }
