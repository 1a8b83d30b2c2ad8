"""Package hygiene: public names are exported, sorted, and importable."""

from __future__ import annotations

import importlib

import pytest

import cachelm
from cachelm import errors

PUBLIC_MODULES = ["cachelm", "cachelm.store"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which is missing"


def test_every_error_derives_from_the_root() -> None:
    for name in ("ConfigError", "BackendError", "IntegrityError", "TenantError", "CheckpointError"):
        cls = getattr(errors, name)
        assert issubclass(cls, cachelm.CacheLMError)
    assert issubclass(errors.ConfigError, ValueError)
