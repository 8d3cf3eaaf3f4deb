"""Scores of the consistency benchmark: per-frame PSNR / SSIM / LPIPS against the ground truth and
the matching history frame, and their means per gap bin, per episode and per row (policy or
reference).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mag.bench.consistency.episodes import UINT8_LEVELS, BenchEpisode
from mag.bench.lpips import MIN_IMAGE_SIDE
from mag.bench.metrics import lpips, psnr, ssim
from mag.pipelines import (
    SamplerConfig,
)

METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips")
TARGETS: tuple[str, ...] = ("vs_gt", "vs_history")
REFERENCE_ROWS: tuple[str, ...] = ("repeat-last", "oracle-copy")
# PSNR of identical frames (MSE 0) would be +inf; it counts as this many dB in every mean.
PSNR_CAP_DB = 100.0
# Gap bins (frames since the view was last seen in the history): (lo, hi], the last one open-ended.
# Past 96 they follow loop episodes (mag.world.loop), whose returns come up to 500 frames later.
GAP_BIN_EDGES: tuple[int, ...] = (0, 6, 12, 18, 24, 36, 48, 72, 96, 150, 200, 300, 400, 500)
# The coarse summary long-memory acceptance reads: beyond-window revisits vs GT with a gap in each
# inclusive range (short: a sliding window just lost the view; long: far past the training horizon).
REVISIT_GAP_RANGES: dict[str, tuple[int, int]] = {"gap_1_24": (1, 24), "gap_97_500": (97, 500)}
# Episodes streamed together at most (memory bound; the tiny model fits far more).
DEFAULT_BATCH_EPISODES = 32


# ---------------------------------------------------------------------------------------------
# Scores


@dataclass
class RowScores:
    """Per-frame scores of one row (a policy or a reference) on every episode.

    ``frames[episode][target][metric]`` is a float64 ``[num_generate]`` array, NaN where not scored.
    """

    name: str
    frames: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)


@dataclass
class ConsistencyResult:
    """Everything the runner measured: per-frame scores of every row, plus strip frames."""

    episodes: list[BenchEpisode]
    policies: dict[str, RowScores]
    references: dict[str, RowScores]
    within: list[np.ndarray]  # per episode, bool [num_generate]
    strip_episode: int
    strip_frames: dict[str, np.ndarray]  # row -> uint8 [num_generate, H, W, 3] of the strip episode


@dataclass(frozen=True)
class ConsistencyConfig:
    """Knobs of one benchmark run.

    Attributes:
        policies: cache policy names (see :func:`mag.pipelines.policy_from_name`). teacher_forced:
        predict each block from the true earlier frames instead of the model's own. sampler: how
        blocks are denoised. batch_size: episodes streamed together at most. seed: noise seed (the
        same noise for every policy). lpips: compute LPIPS (the slowest metric on CPU); off ->
        reported as null. empty_prompt_after_switch: generate with the EMPTY prompt after the switch
        (the history is fed
            with the real one), so what the model draws can come only from its memory -- the setting
            of MAG's history loss (docs/design.md, "Generator (MAG stage 2)").
    """

    policies: tuple[str, ...] = ("full", "window", "downsample")
    teacher_forced: bool = False
    sampler: SamplerConfig = SamplerConfig()
    batch_size: int = DEFAULT_BATCH_EPISODES
    seed: int = 0
    lpips: bool = True
    empty_prompt_after_switch: bool = False

    @property
    def mode(self) -> str:
        return "teacher-forced" if self.teacher_forced else "autoregressive"


def _to_unit(frames: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / UINT8_LEVELS


def _lpips_upsampled(a: Tensor, b: Tensor) -> Tensor:
    """LPIPS on frames upsampled (nearest, integer factor) to at least AlexNet's minimum side."""
    side = min(a.shape[-2:])
    factor = math.ceil(MIN_IMAGE_SIDE / side) if side < MIN_IMAGE_SIDE else 1
    if factor > 1:
        a = F.interpolate(a, scale_factor=factor, mode="nearest")
        b = F.interpolate(b, scale_factor=factor, mode="nearest")
    return lpips(a, b)


def score_pairs(pred: np.ndarray, target: np.ndarray, *, with_lpips: bool = True) -> dict[str,
                                                                                          np.ndarray]:
    """PSNR (capped), SSIM and LPIPS of uint8 frame pairs ``[N, H, W, 3]`` -> float64 ``[N]`` each.

    Identical pairs skip LPIPS (it is exactly 0 there).
    """
    n = pred.shape[0]
    out = {m: np.full(n, np.nan) for m in METRICS}
    if n == 0:
        return out
    a, b = _to_unit(pred), _to_unit(target)
    out["psnr"] = psnr(a, b).double().clamp_max(PSNR_CAP_DB).numpy()
    out["ssim"] = ssim(a, b).double().numpy()
    if with_lpips:
        differ = np.flatnonzero((pred != target).reshape(n, -1).any(axis=1))
        values = np.zeros(n)
        if differ.size:
            index = torch.from_numpy(differ)
            values[differ] = _lpips_upsampled(a[index], b[index]).double().numpy()
        out["lpips"] = values
    return out


def score_episode(pred: np.ndarray, episode: BenchEpisode, *, with_lpips: bool,
                   only_revisited: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Scores of generated frames ``pred: [num_generate, H, W, 3]`` vs GT and vs the matched
    history."""
    n, s = episode.num_generate, episode.switch_frame
    revisited = np.flatnonzero(episode.history_match >= 0)
    scored = revisited if only_revisited else np.arange(n)
    result = {}
    for target, rows, targets in (
        ("vs_gt", scored, episode.frames[s + scored]),
        ("vs_history", revisited, episode.frames[episode.history_match[revisited]]),
    ):
        values = score_pairs(pred[rows], targets, with_lpips=with_lpips)
        full = {m: np.full(n, np.nan) for m in METRICS}
        for m in METRICS:
            full[m][rows] = values[m]
        result[target] = full
    return result


# ---------------------------------------------------------------------------------------------
# Aggregation


def gap_bin_labels() -> list[str]:
    """Labels of the gap bins: ``"1-6"``, ``"7-12"``, ..., ``"401-500"``, ``">500"``."""
    edges = GAP_BIN_EDGES
    return [f"{lo + 1}-{hi}" for lo, hi in zip(edges[:-1], edges[1:],
                                               strict=True)] + [f">{edges[-1]}"]


def _gap_bin(gaps: np.ndarray) -> np.ndarray:
    """Bin index of each gap (-1 for never-seen frames)."""
    index = np.searchsorted(np.asarray(GAP_BIN_EDGES), gaps, side="left") - 1
    return np.where(gaps > 0, index, -1)


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    chosen = values[mask & ~np.isnan(values)]
    return float(chosen.mean()) if chosen.size else None


def psnr_of_mean_mse(psnr_db: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR of the mean MSE of the chosen frames (frames on [0, 1], so MSE = 10^(-PSNR/10)).

    Averaging MSE, not dB, lets identical frames count as MSE 0 instead of a cap that would dominate
    a mean of dB values; the result is capped only when every chosen frame is identical.
    """
    chosen = psnr_db[mask & ~np.isnan(psnr_db)]
    if not chosen.size:
        return None
    mse = float(np.mean(10.0 ** (-chosen / 10.0)))
    return min(PSNR_CAP_DB, -10.0 * math.log10(mse)) if mse > 0 else PSNR_CAP_DB


def _category_means(scores: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    means: dict[str, Any] = {m: _mean(scores[m], mask) for m in METRICS}
    means["psnr"] = psnr_of_mean_mse(scores["psnr"], mask)
    return {**means, "frames": int(mask.sum())}


def episode_summary(frame_scores: dict[str, dict[str, np.ndarray]], episode: BenchEpisode,
                    within: np.ndarray) -> dict[str, Any]:
    """Per-episode means: all scored frames, ``within``, ``beyond``, ``unseen`` (vs_gt) and gap
    bins."""
    revisited = episode.history_match >= 0
    bins = _gap_bin(episode.gaps)
    out: dict[str, Any] = {}
    for target in TARGETS:
        scores = frame_scores[target]
        scored = ~np.isnan(scores["psnr"]) & (revisited if target == "vs_history" else True)
        entry = _category_means(scores, scored)
        entry["within"] = _category_means(scores, scored & revisited & within)
        entry["beyond"] = _category_means(scores, scored & revisited & ~within)
        if target == "vs_gt":
            entry["unseen"] = _category_means(scores, scored & ~revisited)
        entry["by_gap"] = {label: _category_means(scores, scored & (bins == b))
                           for b, label in enumerate(gap_bin_labels())}
        out[target] = entry
    return out


def _mean_over_episodes(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of per-episode means, over the episodes that have the category (``episodes`` counts
    them)."""
    out: dict[str, Any] = {}
    for m in METRICS:
        values = [e[m] for e in entries if e[m] is not None]
        out[m] = float(np.mean(values)) if values else None
    out["episodes"] = sum(1 for e in entries if e["psnr"] is not None)
    out["frames"] = sum(e["frames"] for e in entries)
    return out


def revisit_summary(row: RowScores, result: ConsistencyResult) -> dict[str, dict[str, Any]]:
    """Per :data:`REVISIT_GAP_RANGES` range: PSNR vs GT of the mean MSE over every beyond-window
    revisit of the run with a gap in it (all episodes' frames pooled), ``frames`` and ``episodes``.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, (low, high) in REVISIT_GAP_RANGES.items():
        chosen = []
        for scores, ep, within in zip(row.frames, result.episodes, result.within, strict=True):
            psnr_db = scores["vs_gt"]["psnr"]
            gaps = ep.gaps
            mask = ((ep.history_match >= 0) & ~within & (gaps >= low) & (gaps <= high)
                    & ~np.isnan(psnr_db))
            chosen.append(psnr_db[mask])
        pooled = np.concatenate(chosen)
        out[key] = {"psnr": psnr_of_mean_mse(pooled, np.ones(pooled.size, dtype=bool)),
                    "frames": int(pooled.size),
                    "episodes": sum(1 for values in chosen if values.size)}
    return out


def summarize_row(row: RowScores, result: ConsistencyResult) -> tuple[dict[str, Any], list[dict[str,
                                                                                                Any]]]:
    """``(summary over episodes, per-episode summaries)`` of one row (the contract's JSON shape)."""
    per_episode = [episode_summary(scores, ep, within)
                   for scores, ep, within in zip(row.frames, result.episodes, result.within,
                                                 strict=True)]
    summary: dict[str, Any] = {}
    for target in TARGETS:
        entries = [e[target] for e in per_episode]
        entry = _mean_over_episodes(entries)
        categories = ("within", "beyond", "unseen") if target == "vs_gt" else ("within", "beyond")
        for category in categories:
            entry[category] = _mean_over_episodes([e[category] for e in entries])
        entry["by_gap"] = {label: _mean_over_episodes([e["by_gap"][label] for e in entries])
                           for label in gap_bin_labels()}
        summary[target] = entry
    summary["revisits"] = revisit_summary(row, result)
    return summary, per_episode


def episode_record(row: RowScores, index: int, result: ConsistencyResult,
                   summary: dict[str, Any]) -> dict[str, Any]:
    """The per-episode JSON: the episode, its per-frame scores and its means."""
    ep = result.episodes[index]
    scores = row.frames[index]

    def clean(values: np.ndarray) -> list[float | None]:
        return [None if math.isnan(v) else float(v) for v in values]

    return {
        "row": row.name,
        "episode": ep.name,
        "prompt": ep.prompt,
        "switch_frame": ep.switch_frame,
        "num_generated": ep.num_generate,
        "frames": ep.frame_indices.tolist(),
        "history_match": ep.history_match.tolist(),
        "gap": ep.gaps.tolist(),
        "within_window": result.within[index].tolist(),
        "scores": {target: {m: clean(scores[target][m]) for m in METRICS} for target in TARGETS},
        "summary": summary,
    }


def config_record(config: ConsistencyConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(config), "mode": config.mode}
