"""tabpfn's ``TabPFNClassifier`` and ``TabPFNRegressor``, their model's rows sharded over the sp group.

The estimators are the package's, with one more parameter, ``backend`` (the
Mosaic strategy over rows, ``"auto"`` by default). Preprocessing, ensembling
and post-processing stay the package's: every rank runs them on the whole
table (on CPU, deterministic for a fixed ``random_state``); only the model's
forward is sharded, each rank computing its share of the rows and the test
rows' outputs gathered, so ``predict``/``predict_proba`` return the same on
every rank. With ``fit_mode="fit_with_cache"``, ``fit`` builds each rank's
K/V cache from its share of the training rows and ``predict`` sends each
rank's share of the test rows through it. Run it under ``torchrun``
(``mosaic.init`` is called for you over the whole launch when you have not),
or in one process.
"""

from __future__ import annotations

import copy

import tabpfn

from ..estimators import ensure_context, with_backend_parameter
from .model import shard_tabpfn

__all__ = ["TabPFNClassifier", "TabPFNRegressor"]


class _RowSharded:
    backend: str

    def _initialize_model_variables(self) -> int:
        ctx = ensure_context()
        if self.device == "auto":
            self.device = str(ctx.device)  # this rank's device (the package would take cuda:0 on every rank)
        byte_size = super()._initialize_model_variables()
        # The package may share built models between estimators: shard copies.
        self.models_ = [shard_tabpfn(copy.deepcopy(m), self.backend, whole_table=True) for m in self.models_]
        return byte_size


@with_backend_parameter
class TabPFNClassifier(_RowSharded, tabpfn.TabPFNClassifier):
    """``tabpfn.TabPFNClassifier`` with its model's rows sharded over the sp group (``backend=`` the strategy)."""


@with_backend_parameter
class TabPFNRegressor(_RowSharded, tabpfn.TabPFNRegressor):
    """``tabpfn.TabPFNRegressor`` with its model's rows sharded over the sp group (``backend=`` the strategy)."""
