"""The backend registry: entry points, explicit registration, install hints, broken plugins."""

from __future__ import annotations

import importlib.util
from importlib.metadata import EntryPoint

import pytest
import torch

import mosaic
from mosaic import registry


@pytest.fixture
def fresh_registry(monkeypatch):
    yield monkeypatch
    monkeypatch.undo()
    registry.refresh_backends()


def test_local_is_always_there():
    assert "local" in mosaic.available_backends()
    assert isinstance(mosaic.get_backend("local"), mosaic.LocalBackend)


def test_missing_package_is_named(fresh_registry):
    """With only mosaic-core (or autoload off), asking for ring names mosaic-ring."""
    if importlib.util.find_spec("mosaic_ring") is not None:
        fresh_registry.setenv("MOSAIC_BACKEND_AUTOLOAD", "0")
    registry.refresh_backends()
    with pytest.raises(mosaic.BackendUnavailable, match="provided by mosaic-ring, which is not installed"):
        mosaic.MultiAxisAttention(16, 4, 1, backend="ring")
    for name, package in (("mesh2d", "mosaic-mesh2d"), ("composed", "mosaic-compose"), ("hierarchical", "mosaic-hier")):
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            with pytest.raises(mosaic.BackendUnavailable, match=package):
                mosaic.get_backend(name)


def test_unknown_backend_lists_what_is_installed():
    with pytest.raises(mosaic.BackendUnavailable, match=r"unknown backend 'warp'. Installed backends: .*local"):
        mosaic.get_backend("warp")


def test_lazy_names_name_their_package():
    for name, module in mosaic._LAZY.items():
        if importlib.util.find_spec(module[0]) is None:
            with pytest.raises(ImportError, match=f"pip install {module[1]}"):
                getattr(mosaic, name)
    with pytest.raises(AttributeError):
        mosaic.NoSuchThing  # noqa: B018


def test_broken_plugin_warns_and_others_still_load(fresh_registry):
    broken = EntryPoint("broken", "mosaic_no_such_module:Backend", registry.ENTRY_POINT_GROUP)
    good = EntryPoint("good", "mosaic.local:LocalBackend", registry.ENTRY_POINT_GROUP)
    registry.refresh_backends()
    fresh_registry.setattr(registry._plugins, "_entries", lambda: {"broken": broken, "good": good})
    with pytest.warns(RuntimeWarning, match="failed to load"), pytest.raises(mosaic.BackendUnavailable):
        mosaic.get_backend("broken")
    assert isinstance(mosaic.get_backend("good"), mosaic.LocalBackend)
    with pytest.raises(mosaic.BackendUnavailable, match="failed to load"):
        mosaic.get_backend("broken")


def test_register_backend_and_reasons():
    class HalfOnly(mosaic.Backend):
        name = "half_only"
        capabilities = mosaic.Capabilities(distributed=False, dtypes=frozenset({torch.float16}), causal=False)

        def plan(self, problem):
            return mosaic.get_backend("local").plan(problem)

    mosaic.register_backend("half_only", HalfOnly)
    try:
        with pytest.raises(ValueError, match="already registered"):
            mosaic.register_backend("half_only", HalfOnly)
        module = mosaic.MultiAxisAttention(16, 4, 1, backend="half_only")
        with pytest.raises(mosaic.BackendNotSupported) as info:
            module(torch.randn(2, 5, 16), causal=True)
        assert "dtype torch.float32 not supported" in str(info.value)
        assert "causal=True not supported" in str(info.value)
    finally:
        mosaic.unregister_backend("half_only")
