"""Tenants: API keys mapped to tenant ids, held only as SHA-256 digests, and the admin key.

Key material never stays in memory in clear: the registry is built from digests (a config file holds
``sha256:<hex>`` entries; keys given in clear through the environment are hashed at the entry point and
dropped). Presenting a key hashes it and compares digests with ``hmac.compare_digest``; the dict lookup is
keyed by the digest, so lookup time does not depend on how much of a key an attacker guessed right.

Config file (JSON)::

    {
      "admin_keys": ["sha256:9f86d0...", ...],
      "tenants": {
        "acme":   {"keys": ["sha256:..."], "hit_floor_ms": 5},
        "globex": {"keys": ["sha256:..."]}
      }
    }

With no tenant keys configured the proxy is *open*: every request is the ``default`` tenant (a local,
single-user set-up). With keys configured a request without a valid key is refused (401).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachelm.errors import ConfigError, TenantError
from cachelm.store.base import DEFAULT_TENANT

_TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")


def hash_key(api_key: str) -> str:
    """The stored form of `api_key`: ``sha256:<hex>``."""
    if not isinstance(api_key, str) or len(api_key) < 8:
        raise ConfigError("`api_key` must be a string of at least 8 characters")
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


def _digest_of(entry: str, where: str) -> bytes:
    match = _DIGEST_RE.fullmatch(entry) if isinstance(entry, str) else None
    if match is None:
        raise ConfigError(f"`{where}` must hold 'sha256:<64 hex>' digests, got {entry!r:.20}")
    return bytes.fromhex(match.group(1))


@dataclass(frozen=True, kw_only=True)
class Tenant:
    """One tenant: its id and per-tenant serving options."""

    tenant_id: str
    hit_floor_ms: float | None = None  # overrides the server-wide floor on hit latency

    def __post_init__(self) -> None:
        if not isinstance(self.tenant_id, str) or not _TENANT_RE.fullmatch(self.tenant_id):
            raise ConfigError(f"`tenant_id` must be 1-64 of [A-Za-z0-9_.-], got {self.tenant_id!r}")
        if self.hit_floor_ms is not None and not 0 <= self.hit_floor_ms <= 10_000:
            raise ConfigError(f"`hit_floor_ms` must be in [0, 10000], got {self.hit_floor_ms!r}")


@dataclass(kw_only=True)
class TenantRegistry:
    """Key digest → tenant, plus admin digests; see `from_config`, `merge_env`, `authenticate`."""

    tenants: dict[bytes, Tenant] = field(default_factory=dict)
    admin_digests: frozenset[bytes] = frozenset()

    @property
    def open(self) -> bool:
        """True when no tenant keys are configured: every request is the default tenant."""
        return not self.tenants

    def add_key(self, tenant: Tenant, digest: bytes) -> None:
        if digest in self.tenants and self.tenants[digest].tenant_id != tenant.tenant_id:
            raise ConfigError(f"one API key is configured for two tenants: {tenant.tenant_id!r}")
        self.tenants[digest] = tenant

    def authenticate(self, api_key: str | None) -> Tenant:
        """The tenant owning `api_key`; TenantError for a missing or unknown key (open mode: default)."""
        if self.open:
            return Tenant(tenant_id=DEFAULT_TENANT)
        if not api_key:
            raise TenantError("missing API key: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(api_key.encode()).digest()
        tenant = self.tenants.get(digest)
        if tenant is None:
            raise TenantError("invalid API key")
        return tenant

    def is_admin(self, api_key: str | None) -> bool:
        """Whether `api_key` is an admin key. Compares against every admin digest in constant time."""
        if not api_key or not self.admin_digests:
            return False
        digest = hashlib.sha256(api_key.encode()).digest()
        found = False
        for admin in self.admin_digests:  # no early exit: time does not say which digest matched
            found |= hmac.compare_digest(digest, admin)
        return found

    def tenant_ids(self) -> list[str]:
        return sorted({t.tenant_id for t in self.tenants.values()} or {DEFAULT_TENANT})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TenantRegistry:
        """Build from a parsed config mapping (see the module docstring)."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"tenant config must be a JSON object, got {type(config).__name__}")
        registry = cls()
        admin = config.get("admin_keys", [])
        if not isinstance(admin, list):
            raise ConfigError(f"`admin_keys` must be a list, got {type(admin).__name__}")
        registry.admin_digests = frozenset(_digest_of(e, "admin_keys") for e in admin)
        tenants = config.get("tenants", {})
        if not isinstance(tenants, Mapping):
            raise ConfigError(f"`tenants` must be an object, got {type(tenants).__name__}")
        for tenant_id, spec in tenants.items():
            if not isinstance(spec, Mapping) or not isinstance(spec.get("keys"), list):
                raise ConfigError(f"`tenants.{tenant_id}` must be an object with a `keys` list")
            tenant = Tenant(tenant_id=tenant_id, hit_floor_ms=spec.get("hit_floor_ms"))
            for entry in spec["keys"]:
                registry.add_key(tenant, _digest_of(entry, f"tenants.{tenant_id}.keys"))
        return registry

    @classmethod
    def from_file(cls, path: str | Path) -> TenantRegistry:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read tenant config `{path}`: {exc}") from exc
        return cls.from_config(config)

    def merge_env(self, api_keys: str | None, admin_key: str | None) -> None:
        """Add keys given in clear (``tenant:key,tenant:key`` and one admin key); only digests are kept."""
        if api_keys:
            for item in api_keys.split(","):
                tenant_id, sep, key = item.strip().partition(":")
                if not sep or not key:
                    raise ConfigError("`CACHELM_API_KEYS` must look like 'tenant:key,tenant:key'")
                self.add_key(Tenant(tenant_id=tenant_id), bytes.fromhex(hash_key(key)[7:]))
        if admin_key:
            self.admin_digests = self.admin_digests | {bytes.fromhex(hash_key(admin_key)[7:])}
