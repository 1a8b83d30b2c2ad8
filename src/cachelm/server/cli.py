"""``cachelm serve``: run the OpenAI-compatible caching proxy.

Environment variables are read here and nowhere deeper (STYLE.md): ``CACHELM_API_KEYS``
(``tenant:key,…``), ``CACHELM_ADMIN_KEY``, ``CACHELM_TENANTS_FILE``, ``CACHELM_UPSTREAM_API_KEY``,
``CACHELM_REDIS_URL``, ``CACHELM_STORE``, ``CACHELM_KEYRING`` (``id:base64key,…``),
``CACHELM_KEY_SECRET``, ``CACHELM_PG_URL``. Keys given in clear are hashed at start-up; only digests are kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cachelm.errors import CacheLMError
from cachelm.server.config import LOCAL_UPSTREAM, ServerConfig
from cachelm.server.tenants import TenantRegistry, hash_key
from cachelm.store.url import sqlite_file


def default_store_url() -> str:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cachelm"
    return f"sqlite:///{root / 'responses.db'}"


def _port(text: str) -> int:
    """An argparse type: a TCP port (0 lets the system choose). Checked here: uvicorn would fail only
    after the model and stores were loaded, or wrap 99999 silently."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--port` must be an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"`--port` must be in [0, 65535], got {port}")
    return port


def _model_revision(text: str) -> tuple[str, str]:
    """An argparse type: ``MODEL=REVISION`` (the revision may be empty; the model may not)."""
    model, sep, revision = text.partition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"`--model-revision` must be MODEL=REVISION, got {text!r}")
    return model, revision


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachelm serve", description="OpenAI-compatible caching proxy.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080)
    p.add_argument(
        "--upstream",
        default=LOCAL_UPSTREAM,
        help="OpenAI-compatible base URL (e.g. https://api.openai.com/v1), or 'local' (default): "
        "the packaged SmolLM2 on the local engine",
    )
    p.add_argument("--store", default=None, help="record store URL (default: SQLite under ~/.cache/cachelm)")
    p.add_argument(
        "--redis", default=None, help="shared mode: Redis URL for records, locks and L1 invalidation"
    )
    p.add_argument("--namespace", default="cachelm", help="key prefix on the shared Redis")
    p.add_argument("--tenants", default=None, help="tenant config JSON (API key digests, admin key digests)")
    p.add_argument("--l1-entries", type=int, default=10_000, help="in-process L1 size (0: no L1)")
    p.add_argument("--semantic", action="store_true", help="semantic layer on (requests may turn it off)")
    p.add_argument("--semantic-embedder", default="minilm", choices=["minilm", "hashing"])
    p.add_argument("--semantic-delta", type=float, default=0.02, help="δ of the error-bounded rule")
    p.add_argument(
        "--semantic-threshold",
        type=lambda v: v if v == "calibrated" else float(v),
        default=None,
        help="static cosine threshold instead of the δ-bounded rule; 'calibrated': the embedder's measured "
        "best-F1 threshold on MeanCache val (checkpoints/semantic/calibration.json)",
    )
    p.add_argument(
        "--semantic-checkpoint",
        default="default",
        help="MiniLM fine-tuned layers: 'default' (shipped), 'none' (published weights) or a checkpoint path",
    )
    p.add_argument("--pg-url", default=None, help="semantic index on PostgreSQL + pgvector (shared mode)")
    p.add_argument("--ttl", type=float, default=None, help="default entry lifetime in seconds")
    p.add_argument("--hit-floor-ms", type=float, default=0.0, help="pad every hit to at least this latency")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--upstream-timeout", type=float, default=120.0)
    p.add_argument("--lease-ms", type=int, default=10_000, help="cross-replica lock lease")
    levels = ["debug", "info", "warning", "error", "critical"]
    p.add_argument("--log-level", default="info", type=str.lower, choices=levels)
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument(
        "--no-stream-usage",
        action="store_true",
        help="do not add stream_options.include_usage to streamed upstream calls (for upstreams without it)",
    )
    p.add_argument(
        "--no-request-log",
        action="store_true",
        help="do not keep the request behind each answer (then `cachelm refresh` can only drop entries)",
    )
    p.add_argument(
        "--model-revision",
        type=_model_revision,
        action="append",
        default=[],
        metavar="MODEL=REVISION",
        help="the revision of a model answering behind the proxy (part of its answers' keys; repeatable)",
    )
    p.add_argument("--hash-key", metavar="KEY", help="print the digest to put in a tenant config, and exit")
    return p


def config_from(args: argparse.Namespace) -> tuple[ServerConfig, TenantRegistry]:
    env = os.environ
    tenants_file = args.tenants or env.get("CACHELM_TENANTS_FILE")
    registry = TenantRegistry.from_file(tenants_file) if tenants_file else TenantRegistry()
    registry.merge_env(env.get("CACHELM_API_KEYS"), env.get("CACHELM_ADMIN_KEY"))
    config = ServerConfig(
        upstream=args.upstream,
        upstream_api_key=env.get("CACHELM_UPSTREAM_API_KEY"),
        store_url=args.store or env.get("CACHELM_STORE") or default_store_url(),
        redis_url=args.redis or env.get("CACHELM_REDIS_URL"),
        namespace=args.namespace,
        l1_entries=args.l1_entries,
        semantic=args.semantic,
        semantic_embedder=args.semantic_embedder,
        semantic_delta=args.semantic_delta,
        semantic_threshold=args.semantic_threshold,
        semantic_checkpoint=args.semantic_checkpoint,
        pg_url=args.pg_url or env.get("CACHELM_PG_URL"),
        default_ttl=args.ttl,
        hit_floor_ms=args.hit_floor_ms,
        max_body_bytes=args.max_body_bytes,
        upstream_timeout_s=args.upstream_timeout,
        lease_ms=args.lease_ms,
        key_secret=env.get("CACHELM_KEY_SECRET", "").encode(),
        keyring=env.get("CACHELM_KEYRING"),
        access_log=not args.no_access_log,
        stream_usage=not args.no_stream_usage,
        request_log=not args.no_request_log,
        model_revisions=tuple(args.model_revision),
    )
    return config, registry


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until interrupted; returns the exit status (2 for a configuration error)."""
    p = parser()
    args = p.parse_args(argv)
    if args.hash_key is not None:  # "" too: an empty key must not fall through to starting the server
        if not args.hash_key:
            p.error("`--hash-key` must not be empty")
        print(hash_key(args.hash_key))
        return 0
    import uvicorn

    from cachelm.server.app import build_app
    from cachelm.server.observability import setup_logging
    from cachelm.server.runtime import Runtime

    setup_logging(args.log_level)
    try:
        config, registry = config_from(args)
        if (db := sqlite_file(config.store_url)) is not None:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        runtime = Runtime(config, registry)
    except CacheLMError as exc:
        print(f"cachelm serve: {exc}", file=sys.stderr)
        return 2
    fast = (
        importlib.util.find_spec("uvloop") is not None and importlib.util.find_spec("httptools") is not None
    )
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(runtime),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            loop="uvloop" if fast else "asyncio",
            http="httptools" if fast else "h11",
            lifespan="on",
            timeout_keep_alive=30,
        )
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
