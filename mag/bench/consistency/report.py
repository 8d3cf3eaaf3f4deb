"""Files of a consistency run: ``summary.json``, ``episodes.jsonl``, ``summary.md`` and the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mag.bench.consistency.plots import plot_psnr_vs_gap, write_revisit_strip
from mag.bench.consistency.scores import (
    METRICS,
    PSNR_CAP_DB,
    REVISIT_GAP_RANGES,
    ConsistencyConfig,
    ConsistencyResult,
    config_record,
    episode_record,
    gap_bin_labels,
    summarize_row,
)
from mag.config import Preset
from mag.errors import InputError
from mag.io import files

# ---------------------------------------------------------------------------------------------
# Report files


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# Decimals shown in the markdown table per metric.
_TABLE_DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3}


def markdown_summary(summary: dict[str, Any]) -> str:
    """Two tables (vs ground truth, vs history): PSNR / SSIM / LPIPS over all, within and beyond
    frames."""
    rows = {**summary["policies"], **summary["references"]}
    lines = [f"# Consistency benchmark ({summary['mode']}, {summary['episodes']} episodes)", "",
             "within/beyond: the window policy's attention (sink "
             f"{summary['window']['sink_frames']} +"
             f" last {summary['window']['window_frames']} frames before the block). PSNR in dB, "
             "capped at"
             f" {PSNR_CAP_DB:g}; oracle-copy is scored on revisited frames only.", ""]
    for target, title in (("vs_gt", "vs ground truth"), ("vs_history", "vs history (same view)")):
        lines += [f"## {title}", "",
                  "| row | PSNR | SSIM | LPIPS | PSNR within | SSIM within | LPIPS within | PSNR "
                  "beyond"
                  " | SSIM beyond | LPIPS beyond | episodes beyond |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            entry = row[target]
            cells = [_fmt(entry[m], _TABLE_DIGITS[m]) for m in METRICS]
            for category in ("within", "beyond"):
                cells += [_fmt(entry[category][m], _TABLE_DIGITS[m]) for m in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['beyond']['episodes']} |")
        lines.append("")
    return "\n".join(lines + revisit_table(rows))


def revisit_table(rows: dict[str, Any]) -> list[str]:
    """Markdown lines: per row, PSNR vs GT of the mean MSE over the beyond-window revisits of each
    gap range (all episodes pooled) and how many frames that is."""
    ranges = [(key, f"gap {low}-{high}") for key, (low, high) in REVISIT_GAP_RANGES.items()]
    lines = ["## Beyond-window revisits by gap (PSNR vs GT of the mean MSE, episodes pooled)", "",
             "| row | " + " | ".join(f"PSNR {title} | frames" for _, title in ranges) + " |",
             "|---|" + "---|---|" * len(ranges)]
    for name, row in rows.items():
        cells = [f"{_fmt(row['revisits'][key]['psnr'], _TABLE_DIGITS['psnr'])} |"
                 f" {row['revisits'][key]['frames']}" for key, _ in ranges]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_json(path: Path, data: Any) -> None:
    files.write_json(path, data, indent=1)


def write_results(out_dir: str | Path, result: ConsistencyResult, config: ConsistencyConfig,
                  preset: Preset, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md``, ``episodes/<row>/<episode>.json``, ``metadata.json``
    and the two plots into ``out_dir``; return the summary."""

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror}") from err
    summary: dict[str, Any] = {
        "mode": config.mode,
        "episodes": len(result.episodes),
        "window": {"sink_frames": preset.cache.sink_frames,
                   "window_frames": preset.cache.window_frames,
                   "frames_per_block": preset.cache.frames_per_block},
        "psnr_cap_db": PSNR_CAP_DB,
        "gap_bins": gap_bin_labels(),
        "revisit_gap_ranges": {key: list(bounds) for key, bounds in REVISIT_GAP_RANGES.items()},
        "policies": {},
        "references": {},
    }
    for group, rows in (("policies", result.policies), ("references", result.references)):
        for name, row in rows.items():
            row_summary, per_episode = summarize_row(row, result)
            summary[group][name] = row_summary
            for index, episode_entry in enumerate(per_episode):
                record = episode_record(row, index, result, episode_entry)
                write_json(out / "episodes" / name / f"{result.episodes[index].name}.json", record)
    summary["config"] = config_record(config)
    summary["metadata"] = metadata
    write_json(out / "summary.json", summary)
    write_json(out / "metadata.json", metadata)
    files.write_text(out / "summary.md", markdown_summary(summary))
    plot_psnr_vs_gap(summary, out / "psnr_vs_gap.png")
    write_revisit_strip(result, out / "revisit_strip.png")
    return summary
