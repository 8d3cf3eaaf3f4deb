"""Figures of the consistency benchmark: PSNR vs gap length per row, and a revisit strip of
frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mag.bench.consistency.scores import ConsistencyResult
from mag.io.files import save_figure
from mag.io.video import write_png_strip

# Frames shown in the revisit strip, and how many of them come before the first beyond-window
# revisit.
STRIP_FRAMES = 8
STRIP_LEAD_FRAMES = 2
# Nearest-neighbour upscale of strip frames (16-32 px frames are too small to see).
STRIP_SCALE = 3
FIGURE_SIZE_IN = (11.0, 4.0)
FIGURE_DPI = 120
# Rows drawn dashed (references) and rows left out of the gap plot (oracle-copy sits at the PSNR
# cap).
REFERENCE_STYLE = "--"
GAP_PLOT_SKIP = ("oracle-copy",)


def plot_psnr_vs_gap(summary: dict[str, Any], path: str | Path) -> Path:
    """PSNR vs gap bin (frames since the view was last seen in the history), vs GT and vs history.

    One line per policy (solid) and for ``repeat-last`` (dashed); bins without frames are gaps in
    the line, and bins no row has a frame in are left off the axis (backtracks stop near 96).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, row, "-") for name, row in summary["policies"].items()]
    rows += [(name, row, REFERENCE_STYLE) for name, row in summary["references"].items()
             if name not in GAP_PLOT_SKIP]
    labels = [label for label in summary["gap_bins"]
              if any(row[target]["by_gap"][label]["frames"] for _, row, _ in rows
                     for target in ("vs_gt", "vs_history"))] or summary["gap_bins"]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, sharey=True)
    for ax, target, title in zip(axes, ("vs_gt", "vs_history"), ("vs ground truth", "vs history"),
                                 strict=True):
        for name, row, style in rows:
            values = [row[target]["by_gap"][label]["psnr"] for label in labels]
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(x, y, style, marker="o", label=name)
        ax.set_xticks(x, labels, rotation=45)
        ax.set_xlabel("gap: frames since the view was last seen")
        ax.set_title(f"PSNR {title} ({summary['mode']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].legend(fontsize="small")
    window = summary["window"]
    fig.suptitle(f"{summary['episodes']} episodes; window policy: {window['sink_frames']} sink +"
                 f" {window['window_frames']} recent frames", fontsize="small")
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def write_revisit_strip(result: ConsistencyResult, path: str | Path) -> Path:
    """GT | history frame of the same view | each policy's frames around the first beyond-window
    revisit of one episode (the first episode that has one)."""

    index = result.strip_episode
    ep = result.episodes[index]
    beyond = np.flatnonzero((ep.history_match >= 0) & ~result.within[index])
    revisited = np.flatnonzero(ep.history_match >= 0)
    first = beyond[0] if beyond.size else (revisited[0] if revisited.size else 0)
    start = max(0, min(int(first) - STRIP_LEAD_FRAMES, ep.num_generate - STRIP_FRAMES))
    window = slice(start, min(start + STRIP_FRAMES, ep.num_generate))
    s = ep.switch_frame
    rows = [ep.frames[s:s + ep.num_generate][window], result.strip_frames["oracle-copy"][window]]
    labels = [f"ground truth, episode {ep.name}, frames {s + start}..{s + window.stop - 1}",
              "history frame of the same view (black: never seen)"]
    for name in result.policies:
        rows.append(result.strip_frames[name][window])
        labels.append(name)
    return write_png_strip(path, rows, labels, scale=STRIP_SCALE)
