"""The installed tabpfn and tabicl still have every function the adapters override, wrap or call, as expected.

A failure names the function whose signature moved (``mosaic_tabular.upstream.EXPECTED``).
"""

from __future__ import annotations

import importlib.util

import pytest

from mosaic_tabular.upstream import signature_changes


@pytest.mark.parametrize("package", ["tabpfn", "tabicl"])
def test_upstream_signatures_are_the_ones_the_adapters_expect(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package} (pip install mosaic-tabular[{package}])")
    assert signature_changes(package) == []
