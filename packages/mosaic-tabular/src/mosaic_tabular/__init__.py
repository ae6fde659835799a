"""TabPFN and TabICL with their rows sharded over the sp group by Mosaic: the models and the estimators.

``mosaic_tabular.tabpfn`` (needs ``mosaic-tabular[tabpfn]``) and ``mosaic_tabular.tabicl``
(``[tabicl]``) hold the adapters; this module imports neither package.
"""

from __future__ import annotations

from .rows import RowSplit
from .upstream import UpstreamChanged, check_upstream
from .weights import randomize_

__all__ = ["RowSplit", "UpstreamChanged", "check_upstream", "randomize_"]
