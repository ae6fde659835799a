"""Plots of bench_capacity.py's JSON: step time and peak memory against rows per GPU (PNG).

python benchmarks/plot_capacity.py capacity.json --out docs/results/capacity.png
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
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, found in data["modes"].items():
        points = found["points"]
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
