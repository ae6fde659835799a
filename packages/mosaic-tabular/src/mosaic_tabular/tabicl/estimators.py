"""tabicl's ``TabICLClassifier`` and ``TabICLRegressor``, their model's rows sharded over the sp group.

The package's estimators with one more parameter, ``backend`` (the Mosaic
strategy over rows, ``"auto"`` by default). Their preprocessing and ensembling
run on every rank on the whole table; the model's forward runs on this rank's
rows, and the test rows' outputs are gathered, so ``predict``/``predict_proba``
return the same on every rank. With ``kv_cache=True`` (or ``"kv"``/``"repr"``),
``fit`` builds each rank's cache from its share of the training rows, and
``predict`` sends each rank's share of the test rows through it.
"""

from __future__ import annotations

import tabicl

from ..estimators import ensure_context, with_backend_parameter
from .model import shard_tabicl

__all__ = ["TabICLClassifier", "TabICLRegressor"]


class _RowSharded:
    backend: str

    def _load_model(self) -> None:
        ctx = ensure_context()
        if self.device is None:
            self.device = str(ctx.device)  # this rank's device (the package would take cuda:0 on every rank)
        super()._load_model()
        shard_tabicl(self.model_, self.backend, whole_table=True)


@with_backend_parameter
class TabICLClassifier(_RowSharded, tabicl.TabICLClassifier):
    """``tabicl.TabICLClassifier`` with its model's rows sharded over the sp group (``backend=`` the strategy)."""


@with_backend_parameter
class TabICLRegressor(_RowSharded, tabicl.TabICLRegressor):
    """``tabicl.TabICLRegressor`` with its model's rows sharded over the sp group (``backend=`` the strategy)."""
