"""A run folder's log and its guards: metrics.jsonl cut back on resume, divergence detected.

``metrics.jsonl`` is append-only while its run holds the folder's lock (:mod:`mag.io.lock`); a
resume first rewrites it atomically with only the records up to the resumed step (a torn last line
from a killed run is dropped), so no step appears twice. A non-finite loss, gradient norm or weight
stops training with :class:`TrainingDiverged` naming the newest checkpoint, which is always finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mag.errors import MagError
from mag.io.files import write_text

__all__ = ["GUARDED_STATS", "TrainingDiverged", "check_record", "cut_metrics"]

# Statistics present in every step's log record that must stay finite (DMD: the critic's).
GUARDED_STATS = ("loss", "grad_norm")


class TrainingDiverged(MagError):
    """The loss, a gradient or a weight became NaN or infinite."""


def cut_metrics(path: Path, step: int) -> int:
    """Keep the records of ``path`` with ``step <= step`` (and parseable); returns how many were
    dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"),
                                                   int) and record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def check_record(record: Mapping[str, Any], newest: Path | None, hint: str) -> None:
    """Raise TrainingDiverged when a guarded statistic of a log record is not finite."""
    bad = {k: record[k] for k in GUARDED_STATS if k in record and not math.isfinite(record[k])}
    if bad:
        raise diverged(f"{', '.join(f'{k} {v}' for k, v in bad.items())} at step "
                       f"{record.get('step')}",
                       newest, hint)


def diverged(what: str, newest: Path | None, hint: str) -> TrainingDiverged:
    keep = f"the newest checkpoint, {newest}, is finite" if newest else "no checkpoint was written"
    return TrainingDiverged(f"training diverged: {what}; stopped ({keep}); {hint}")


# Per-category loss statistics, averaged by element count rather than per step.
CATEGORY_STATS = ("category_mean", "category_count")


def interval_mean(steps: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One log record's statistics from the steps since the last record (device tensors, no sync).

    Scalars are averaged ignoring NaN (a DMD generator loss exists only on generator steps, so it is
    the mean over the interval's generator steps, NaN if there was none); per-category losses are
    weighted by their element counts, as :meth:`Trainer._log_record` weights ranks.
    """
    out: dict[str, Tensor] = {}
    for key in steps[0]:
        if key in CATEGORY_STATS:
            continue
        out[key] = torch.nanmean(torch.stack([step[key].float() for step in steps]))
    if "category_mean" in steps[0]:
        counts = torch.stack([step["category_count"] for step in steps])
        sums = (
            torch.stack([torch.nan_to_num(step["category_mean"]) for step in steps]) * counts
        ).sum(0)
        total = counts.sum(0)
        out["category_mean"] = torch.where(total > 0, sums / total.clamp_min(1), math.nan)
        out["category_count"] = total
    return out


def to_host(stats: dict[str, Tensor]) -> dict[str, Any]:
    return {k: float(v) for k, v in stats.items()}


class NullFile:
    """A stand-in for the metrics file on ranks that do not log."""

    def __enter__(self) -> NullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, _: str) -> None:
        return None

    def flush(self) -> None:
        return None
