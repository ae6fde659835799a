"""TabPFN v2 (tabpfn 9.2.0) with its rows sharded over the sp group, through Mosaic's public API.

Only the attention between the cells of a column (``AlongColumnAttention``,
the attention over rows) needs the other ranks; everything else in a
``TabPFNBlock`` — the attention between features, the norms, the MLP — works
on whole rows and runs unchanged. :class:`RowShardedAlongColumnAttention`
subclasses the package's module (same projections, same parameter names, so
the unsharded ``state_dict`` loads) and replaces its forward:

- training rows' queries attend to the training rows with every head;
- test rows' queries attend to the training rows with key/value head 0 only.
  In tabpfn 9.2.0 this is not an option: ``AlongColumnAttention.forward``
  always does it (``k_BcNHD[:, :, :1]``, multi-query attention for the test
  set, so that the cache holds one head). Here it is a second
  ``mosaic.attention`` call with one kv head (GQA);
- ``return_kv=True`` returns this rank's part of the cache: the projected
  key/value head 0 of its training rows (a row-sharded cache);
- ``cached_kv=...`` (every row a test row) attends the queries to the
  row-sharded cache with ``mosaic.attention``.

``single_eval_pos`` keeps the package's meaning on this rank's rows: the
number of this rank's rows that are training rows (rows are sharded in order,
so they are a prefix: ``ShardedDim.prefix_count(n_train)``), not the global
count. The block passes it through, so ``block(x, rows.prefix_count(n), None)``
is the whole change for a caller.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tabpfn.architectures.kv_cache import KVCacheEntry
from tabpfn.architectures.tabpfn_v2 import AlongColumnAttention

import mosaic


class RowShardedAlongColumnAttention(AlongColumnAttention):
    """TabPFN v2's attention between the cells of a column, rows sharded in order over the sp group.

    Args:
        embedding_size, num_heads, head_dim, device, dtype: as for ``AlongColumnAttention``.
        backend: the Mosaic strategy over rows (a distributed one: ``"allgather"``, ``"ring"``, ...).
    """

    def __init__(self, *args, backend: str = "allgather", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(
        self,
        x_BcRE: torch.Tensor,
        single_eval_pos: int | None = None,
        *,
        cached_kv: KVCacheEntry | None = None,
        return_kv: bool = False,
    ) -> tuple[torch.Tensor, KVCacheEntry | None]:
        """The package's forward on this rank's rows; ``single_eval_pos`` counts this rank's training rows."""
        bc, r, _ = x_BcRE.shape
        q = self.heads(self.q_projection(x_BcRE))
        kv_entry = None
        if cached_kv is not None:
            # Every row is a test row: queries attend to every rank's cached head-0 keys/values.
            k, v = (t.to(q.dtype).transpose(1, 2) for t in (cached_kv.key, cached_kv.value))
            out = self.attend(q, k, v, "test rows -> cached training rows")
        else:
            n = r if single_eval_pos is None else single_eval_pos
            k = self.heads(self.k_projection(x_BcRE[:, :n]))
            v = self.heads(self.v_projection(x_BcRE[:, :n]))
            # Both calls run on every rank, also on one that holds no training or no test rows:
            # every rank of the sp group must join each sharded call.
            train = self.attend(q[:, :, :n], k, v, "training rows -> training rows")
            test = self.attend(q[:, :, n:], k[:, :1], v[:, :1], "test rows -> training rows, kv head 0")
            out = torch.cat([train, test], dim=2)
            if return_kv:
                kv_entry = KVCacheEntry(
                    key=k[:, :1].transpose(1, 2).contiguous().detach(),
                    value=v[:, :1].transpose(1, 2).contiguous().detach(),
                )
        out = out.transpose(1, 2).reshape(bc, r, self.head_dim * self.num_heads)
        return self.out_projection(out), kv_entry

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(Bc, R, H * D)`` -> ``(Bc, H, R, D)``, the layout ``mosaic.attention`` takes."""
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> torch.Tensor:
        # The keys are this rank's training rows (a prefix of its rows), not a declared layout: sharded=True.
        return mosaic.attention(
            q, k, v, backend=self.backend, sharded=True, name=f"TabPFN v2 column attention ({what})"
        )


def shard_rows(module: nn.Module, backend: str = "allgather") -> nn.Module:
    """Replace every ``AlongColumnAttention`` in ``module`` (a block or a model) by the row-sharded one, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is AlongColumnAttention:
                weight = child.q_projection.weight
                sharded = RowShardedAlongColumnAttention(
                    embedding_size=weight.shape[1], num_heads=child.num_heads, head_dim=child.head_dim,
                    device=weight.device, dtype=weight.dtype, backend=backend,
                )  # fmt: skip
                sharded.load_state_dict(child.state_dict())
                setattr(parent, name, sharded)
    return module
