"""What is alive at the peak of an allocator snapshot (``bench_memory.py --snapshot``): size and origin.

Replays the snapshot's trace of one device, finds the moment of most allocated
bytes and prints the blocks alive then, largest first, each with the innermost
frames of Python code (not torch's) that allocated it.

    python benchmarks/memory_peak.py snapshot.pickle [--frames 3]
"""

from __future__ import annotations

import argparse
import pickle


def _origin(frames: list[dict], depth: int) -> str:
    ours = [f for f in frames if f["filename"].endswith(".py") and "/torch/" not in f["filename"]]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in ours[:depth]) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot")
    parser.add_argument("--frames", type=int, default=3)
    args = parser.parse_args()
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    trace = next(t for t in snapshot["device_traces"] if t)
    live: dict[int, dict] = {}
    now = peak = 0
    at_peak: dict[int, dict] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > peak:
                peak, at_peak = now, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    print(f"peak {peak / 2**30:.3f} GiB over the recorded step ({len(at_peak)} blocks)")
    for event in sorted(at_peak.values(), key=lambda e: -e["size"]):
        if event["size"] < 2**20:
            break
        print(f"{event['size'] / 2**30:8.3f} GiB  {_origin(event.get('frames', []), args.frames)}")


if __name__ == "__main__":
    main()
