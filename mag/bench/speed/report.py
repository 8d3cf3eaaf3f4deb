"""The speed report on disk: the JSON (written atomically after every policy) and its plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mag.io import files

PLOT_DPI = 120
# The peak figure of a policy row: device memory on CUDA, resident-set growth on the CPU. Files
# written before the rename carry ``peak_memory_bytes`` (device on CUDA, resident set on the CPU
# alike).
PEAK_KEYS = ("peak_device_bytes", "peak_rss_bytes", "peak_memory_bytes")


def peak_key(row: dict[str, Any]) -> str:
    """The key holding the row's peak figure, old result files included."""
    for key in PEAK_KEYS:
        if key in row:
            return key
    raise KeyError(f"no peak figure in the row (one of {', '.join(PEAK_KEYS)})")


def peak_bytes(row: dict[str, Any]) -> int:
    """The row's peak bytes, whichever key (:data:`PEAK_KEYS`) holds them."""
    return row[peak_key(row)]


def write_json(path: Path, report: dict[str, Any]) -> None:
    files.write_json(path, report, allow_nan=True)


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """PNG: fps per policy (bars) and KV bytes vs video frames per policy (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["policies"]
    names = list(rows)
    fig, (ax_fps, ax_kv) = plt.subplots(1, 2, figsize=(11, 4))
    ax_fps.bar(names, [rows[n]["fps"] for n in names], color="tab:blue")
    ax_fps.set_yscale("log")
    ax_fps.set_ylabel("video frames / s")
    compiled = " + compile" if report["compile"]["used"] else ""
    ax_fps.set_title(f"{report['preset']} {report['device']} {report['dtype']}{compiled}")
    for i, n in enumerate(names):
        ax_fps.annotate(f"{rows[n]['fps']:.1f}", (i, rows[n]["fps"]), ha="center", va="bottom")
    for n in names:
        frames, nbytes = zip(*rows[n]["kv_bytes"], strict=True)
        ax_kv.plot(frames, nbytes, marker="o", label=n)
    ax_kv.set_xscale("log")
    ax_kv.set_yscale("log")
    ax_kv.set_xlabel("video frames streamed")
    ax_kv.set_ylabel("KV cache bytes")
    ax_kv.set_title("KV cache size as the stream grows")
    ax_kv.legend()
    fig.tight_layout()
    files.save_figure(fig, path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
