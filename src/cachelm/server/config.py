"""Settings of one proxy process. Built by the CLI from flags and environment; validated here."""

from __future__ import annotations

from dataclasses import dataclass

from cachelm.errors import ConfigError

LOCAL_UPSTREAM = "local"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `build_app` needs. `upstream` is an http(s) URL or ``"local"`` (the packaged engine)."""

    upstream: str = LOCAL_UPSTREAM
    upstream_api_key: str | None = None
    store_url: str = "sqlite:///cachelm-cache.db"
    redis_url: str | None = None  # shared mode: records, locks and invalidation on this Redis
    namespace: str = "cachelm"
    l1_entries: int = 10_000
    semantic: bool = False  # build the semantic layer; on for every request unless it says off
    semantic_embedder: str = "minilm"  # or "hashing" (lexical, no model)
    semantic_delta: float = 0.02  # error bound of the δ-bounded rule (requests may ask for their own)
    semantic_checkpoint: str = "default"  # MiniLM's fine-tuned layers: "default", "none" or a path
    semantic_threshold: float | str | None = None  # static cosine threshold (or "calibrated") instead of δ
    pg_url: str | None = None  # semantic index on PostgreSQL + pgvector (shared mode)
    default_ttl: float | None = None
    hit_floor_ms: float = 0.0  # constant-latency padding of hits (0: off)
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_timeout_s: float = 120.0
    lease_ms: int = 10_000
    key_secret: bytes = b""
    keyring: str | None = None  # at-rest encryption: 'id:base64key,...' (crypto.Keyring.parse)
    access_log: bool = True
    stream_usage: bool = True  # ask streaming upstreams for token usage, to record it with the answer
    # Keep the request behind each answer (cachelm.governance.journal), so `cachelm refresh` can recompute
    # the most valuable entries after a model change instead of dropping them. Costs one record per answer.
    request_log: bool = True
    local_model: str = "smollm2"
    # (model id, revision) pairs: a model's revision is part of its answers' keys (exact and semantic), so
    # answers of an old revision are never served once the revision changes (`POST /admin/refresh`).
    model_revisions: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.upstream != LOCAL_UPSTREAM and not self.upstream.startswith(("http://", "https://")):
            raise ConfigError(f"`upstream` must be an http(s) URL or 'local', got {self.upstream!r}")
        if self.l1_entries < 0:
            raise ConfigError(f"`l1_entries` must be >= 0, got {self.l1_entries!r}")
        if not 0 <= self.hit_floor_ms <= 10_000:
            raise ConfigError(f"`hit_floor_ms` must be in [0, 10000], got {self.hit_floor_ms!r}")
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ConfigError(f"`max_body_bytes` must be in [1 KiB, 1 GiB], got {self.max_body_bytes!r}")
        if self.upstream_timeout_s <= 0:
            raise ConfigError(f"`upstream_timeout_s` must be > 0, got {self.upstream_timeout_s!r}")
        if self.default_ttl is not None and self.default_ttl <= 0:
            raise ConfigError(f"`default_ttl` must be > 0 or None, got {self.default_ttl!r}")
        models = [pair[0] for pair in self.model_revisions if isinstance(pair, tuple) and len(pair) == 2]
        if len(models) != len(self.model_revisions) or not all(
            isinstance(model, str) and model and isinstance(revision, str)
            for model, revision in self.model_revisions
        ):
            raise ConfigError(
                f"`model_revisions` must be (model, revision) string pairs, got {self.model_revisions!r}"
            )
        if len(set(models)) != len(models):
            raise ConfigError(f"`model_revisions` names a model twice: {sorted(models)}")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"`redis_url` must be a redis:// URL, got {self.redis_url!r}")
