"""cachelm: a layered cache for language models."""

from cachelm.errors import (
    BackendError,
    CacheLMError,
    CheckpointError,
    ConfigError,
    IntegrityError,
    TenantError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CacheLMError",
    "CheckpointError",
    "ConfigError",
    "IntegrityError",
    "TenantError",
    "__version__",
]
