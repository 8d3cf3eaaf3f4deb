"""Per-block latency at points of a `mag bench speed` stream: does a policy's cost stay flat?

"Latency at N frames" is the median per-block latency of the blocks that make the ``--span`` video
frames ending at frame N (with ``--rounds``, each block's latency is already the median over the
rounds). Prints, per policy, that latency at each ``--at`` mark and its ratio to the first mark
(issue 8: bounded at 10,000 frames <= 1.1x at 100), and with ``--json OUT`` writes the same table as
JSON.

Usage: python scripts/latency_growth.py results/speed/cpu-tiny-10k-slots32.json [--at
100,1000,10000]
           [--json-out TABLE.json] [--plot CURVE.png]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from mag.io.files import save_figure, write_json

DEFAULT_MARKS = "100,1000,3000,10000"
DEFAULT_SPAN_FRAMES = 15


def latency_at(row: dict[str, Any], mark: int, span: int) -> float | None:
    """Median latency (ms) of the blocks covering video frames ``(mark - span, mark]``; None past
    the end."""
    blocks = row["latency_ms_blocks"]
    frames_per_block = row["video_frames"] / len(blocks)
    last = math.ceil(mark / frames_per_block)
    if last > len(blocks):
        return None
    first = max(0, last - max(1, round(span / frames_per_block)))
    return statistics.median(blocks[first:last])


def growth_table(report: dict[str, Any], marks: list[int], span: int) -> dict[str, dict[str, Any]]:
    """Per policy: latency at each mark and its ratio to the first mark."""
    table: dict[str, dict[str, Any]] = {}
    for name, row in report["policies"].items():
        at = {mark: latency_at(row, mark, span) for mark in marks}
        base = at[marks[0]]
        ratios = {m: (v / base if v is not None and base else None) for m, v in at.items()}
        table[name] = {"latency_ms_at": at, "ratio_to_first": ratios}
    return table


def plot_curves(report: dict[str, Any], path: Path, span: int) -> None:
    """Per-block latency against the stream position, a running median over ``span`` frames per
    policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, row in report["policies"].items():
        blocks = row["latency_ms_blocks"]
        frames_per_block = row["video_frames"] / len(blocks)
        width = max(1, round(span / frames_per_block))
        smooth = [statistics.median(blocks[max(0,
                                               i + 1 - width):i + 1]) for i in range(len(blocks))]
        ax.plot([(i + 1) * frames_per_block for i in range(len(blocks))], smooth, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("video frames streamed")
    ax.set_ylabel(f"ms per block (running median of {span} frames)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report.get('preset', '')} {report.get('device', '')}: per-block latency along "
                 "the stream")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--at", default=DEFAULT_MARKS, help="comma-separated video-frame marks")
    parser.add_argument("--span", type=int, default=DEFAULT_SPAN_FRAMES,
                        help="video frames before each mark whose blocks are pooled")
    parser.add_argument("--json-out", type=Path, default=None, help="write the table as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write the latency curves as a PNG")
    args = parser.parse_args()
    marks = sorted(int(m) for m in args.at.split(",") if m.strip())
    report = json.loads(args.json.read_text())
    table = growth_table(report, marks, args.span)
    for name, row in table.items():
        cells = [f"{m}: {v:.2f} ms (x{row['ratio_to_first'][m]:.3f})" for m,
                 v in row["latency_ms_at"].items() if v is not None]
        print(f"{name}: " + ", ".join(cells))
    if args.json_out is not None:
        write_json(args.json_out, {"source": str(args.json), "span_frames": args.span,
                                   "policies": table},
                   allow_nan=True)
    if args.plot is not None:
        plot_curves(report, args.plot, args.span)


if __name__ == "__main__":
    main()
