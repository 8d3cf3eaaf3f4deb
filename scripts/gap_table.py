"""Print a markdown table of PSNR vs GT by gap bin, one row per policy, from consistency summaries.

Usage: python scripts/gap_table.py results/recall/long-60/teacher-forced/summary.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def gap_table(path: Path) -> str:
    summary = json.loads(path.read_text())
    bins = [b for b in summary["gap_bins"]
            if any(row["vs_gt"]["by_gap"][b]["frames"] for row in summary["policies"].values())]
    lines = [f"{summary['mode']}, {summary['episodes']} episodes ({path})", "",
             "| policy | " + " | ".join(f"gap {b}" for b in bins) + " |",
             "|---|" + "---|" * len(bins)]
    for name, row in summary["policies"].items():
        cells = [row["vs_gt"]["by_gap"][b]["psnr"] for b in bins]
        lines.append(
            f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |"
        )
    frames = [
        next(iter(summary["policies"].values()))["vs_gt"]["by_gap"][b]["frames"] for b in bins
    ]
    lines.append("| frames | " + " | ".join(str(f) for f in frames) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(gap_table(Path(arg)), end="\n\n")
