"""Per-block latency early vs late in a `mag bench speed` stream: does a policy's cost stay flat?

Prints, per policy, the median latency of the blocks that make the first ``--span`` frames and of those
that make the last ``--span`` frames, and their ratio (issue 8: bounded at 10,000 frames <= 1.1x at 100).

Usage: python scripts/latency_growth.py bench/results/speed/cpu-tiny-10k.json [--span 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--span", type=int, default=100, help="frames at each end of the stream")
    args = parser.parse_args()
    report = json.loads(args.json.read_text())
    for name, row in report["policies"].items():
        blocks = row["latency_ms_blocks"]
        per_block = row["video_frames"] / len(blocks)
        count = max(1, round(args.span / per_block))
        early, late = statistics.median(blocks[:count]), statistics.median(blocks[-count:])
        print(f"{name}: p50 {early:.2f} ms over the first {args.span} frames ({count} blocks),"
              f" {late:.2f} ms over the last {args.span} of {row['video_frames']}: x{late / early:.3f}")


if __name__ == "__main__":
    main()
