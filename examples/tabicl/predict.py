"""TabICL's classifier on a synthetic table, its model's rows sharded over every process of the launch.

    python examples/tabicl/predict.py --rows 4000                          # one process
    torchrun --nproc_per_node=4 examples/tabicl/predict.py --rows 20000    # 4 GPUs (NCCL) or CPUs (gloo)

Without ``--model-path`` a checkpoint with random weights is made from
TabICL's default configuration (these machines reach no model hub):
predictions are then meaningless, but the run shows the sharded model working.
Every rank prints the same accuracy; rank 0 shows the progress.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import mosaic
from mosaic_tabular.tabicl import TabICLClassifier, make_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows of the table (half train, half test)")
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--model-path", default=None, help="a TabICL checkpoint (default: random weights)")
    parser.add_argument("--backend", default="auto", help="Mosaic's strategy over rows")
    parser.add_argument("--n-estimators", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="test rows predicted in this many batches")
    parser.add_argument("--kv-cache", default="none", choices=["none", "kv", "repr"],
                        help="build TabICL's cache in fit and predict from it")  # fmt: skip
    args = parser.parse_args()

    ctx = mosaic.init(sp_size=int(os.environ.get("WORLD_SIZE", "1")))
    X, y = make_classification(n_samples=args.rows, n_features=args.features, n_informative=min(10, args.features - 2),
                               n_classes=3, random_state=0)  # fmt: skip
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.5, random_state=0)
    with tempfile.TemporaryDirectory() as tmp:
        # The same seed on every rank: every rank writes the same weights to its own file.
        path = args.model_path or str(make_random_checkpoint(Path(tmp) / f"random_tabicl_{ctx.rank}.ckpt", seed=0))
        clf = TabICLClassifier(model_path=path, n_estimators=args.n_estimators, backend=args.backend,
                               allow_auto_download=False,
                               kv_cache=False if args.kv_cache == "none" else args.kv_cache)  # fmt: skip
        clf.fit(X_train, y_train)
        predictions = [clf.predict(X_test[idx])
                       for idx in tqdm(np.array_split(np.arange(len(X_test)), args.batches),
                                       desc=f"predict (P={ctx.sp_size})", disable=ctx.rank != 0)]  # fmt: skip
    accuracy = float((np.concatenate(predictions) == y_test).mean())
    print(f"rank {ctx.rank}: {len(X_train)} training rows, {len(X_test)} test rows, accuracy {accuracy:.3f}")
    mosaic.shutdown()


if __name__ == "__main__":
    main()
