"""TabPFN's classifier on a synthetic table, its model's rows sharded over every process of the launch.

    python examples/tabpfn/predict.py --rows 4000                          # one process
    torchrun --nproc_per_node=4 examples/tabpfn/predict.py --rows 20000    # 4 GPUs (NCCL) or CPUs (gloo)

Without ``--model-path`` a checkpoint with random weights is made from the
architecture's configuration (``--architecture``, default TabPFN v2.6): these
machines reach no model hub. Predictions are then meaningless, but the run
shows the sharded model working; point ``--model-path`` at a real checkpoint
for real ones. Every rank prints the same accuracy; rank 0 shows the progress.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import mosaic
from mosaic_tabular.tabpfn import TabPFNClassifier, make_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows of the table (half train, half test)")
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--model-path", default=None, help="a TabPFN checkpoint (default: random weights)")
    parser.add_argument("--architecture", default="tabpfn_v2_6", choices=["tabpfn_v2", "tabpfn_v2_5", "tabpfn_v2_6"])
    parser.add_argument("--fit-mode", default="fit_preprocessors",
                        choices=["fit_preprocessors", "low_memory", "fit_with_cache"])  # fmt: skip
    parser.add_argument("--backend", default="auto", help="Mosaic's strategy over rows")
    parser.add_argument("--n-estimators", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="test rows predicted in this many batches")
    args = parser.parse_args()

    ctx = mosaic.init(sp_size=int(os.environ.get("WORLD_SIZE", "1")))
    X, y = make_classification(n_samples=args.rows, n_features=args.features, n_informative=min(10, args.features - 2),
                               n_classes=3, random_state=0)  # fmt: skip
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.5, random_state=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path or _random_checkpoint(ctx, Path(tmp), args.architecture)
        clf = TabPFNClassifier(model_path=path, n_estimators=args.n_estimators, backend=args.backend,
                               fit_mode=args.fit_mode,
                               inference_precision=torch.float32 if ctx.device.type == "cpu" else "auto")  # fmt: skip
        clf.fit(X_train, y_train)
        batches = torch.tensor_split(torch.arange(len(X_test)), args.batches)
        predictions = []
        for idx in tqdm(batches, desc=f"predict (P={ctx.sp_size})", disable=ctx.rank != 0):
            predictions.append(clf.predict(X_test[idx.numpy()]))
    accuracy = float((torch.as_tensor(list(_cat(predictions))) == torch.as_tensor(y_test)).float().mean())
    print(f"rank {ctx.rank}: {len(X_train)} training rows, {len(X_test)} test rows, accuracy {accuracy:.3f}")
    mosaic.shutdown()


def _random_checkpoint(ctx: mosaic.Context, tmp: Path, architecture: str) -> str:
    # The same seed on every rank: every rank writes the same weights to its own file.
    return str(make_random_checkpoint(tmp / f"random_{architecture}_{ctx.rank}.ckpt", architecture, seed=0))


def _cat(parts):
    for p in parts:
        yield from p.tolist()


if __name__ == "__main__":
    main()
