"""Plots of bench_capacity.py's JSON: step time and peak memory against rows per GPU (PNG).

Several files (runs of one machine) are merged: each mode's points from all of them.

python benchmarks/plot_capacity.py capacity.json [more.json ...] --out docs/results/capacity.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.json]
    data = runs[0]
    modes: dict[str, dict[int, dict]] = {}
    for run in runs:
        for mode, found in run["modes"].items():
            modes.setdefault(mode, {}).update({p["rows"]: p for p in found["points"]})
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, by_rows in modes.items():
        points = [by_rows[r] for r in sorted(by_rows)]
        if not points:
            continue
        rows = [p["rows"] for p in points]
        time_ax.plot(rows, [p["seconds"] for p in points], "o-", label=mode)
        mem_ax.plot(rows, [p["peak_gib"] for p in points], "o-", label=mode)
    mem_ax.axhline(data["total_gib"], color="grey", ls="--", lw=1, label="card")
    time_ax.set(xlabel="rows (one table, 10 features)", ylabel="seconds per step", xscale="log", yscale="log")
    mem_ax.set(xlabel="rows (one table, 10 features)", ylabel="peak GiB", xscale="log")
    for ax in (time_ax, mem_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"nanoTabPFN (E = 96, 4 heads, 3 layers), {data['device']}, torch {data['torch']}, bf16")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
