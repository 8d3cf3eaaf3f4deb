"""Memory reconstruction benchmark (``mag bench memory``): how much of a block comes back from its
compressed memory?

Held-out clips run the memory model's training-style pass (:func:`mag.memory.memory_training_mask`,
empty prompt, RoPE from 0), which equals the streaming path; one-step and few-step reconstructions
are scored per level on retained and non-retained frames, beside an optional baseline model and two
model-free reference rows (codec round trip, copy-retained). Noise is drawn on the CPU from ``(seed,
episode)``, so results do not depend on the device, the batch size or the model. Protocol:
docs/memory.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mag.bench.consistency.episodes import BenchEpisode
from mag.bench.consistency.report import write_json
from mag.bench.consistency.scores import METRICS, psnr_of_mean_mse, score_pairs
from mag.codecs import Codec, frames_to_tensor, get_codec_for, tensor_to_frames
from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.io.files import write_text
from mag.io.video import write_png_strip
from mag.memory import memory_training_mask
from mag.models.dit import WanDiT
from mag.objectives.flow_matching import clean_noisy_forward
from mag.schedulers import FlowMatchScheduler

__all__ = ["FEW_STEP", "REFERENCE_ROWS", "TARGET_PSNR_DB", "ReconConfig", "ReconResult",
           "clip_length",
           "markdown_summary", "one_step_label", "reconstruct", "run_memory_recon", "summarize",
           "write_results"]

# Row of the full few-step sampler from pure noise.
FEW_STEP = "few-step"
# Issue 5's target for the tiny preset: few-step reconstructions at or above this PSNR.
TARGET_PSNR_DB = 30.0
# Noise seeds: episode i of seed s draws from seed * NOISE_SEED_STRIDE + i.
NOISE_SEED_STRIDE = 1_000_003
# Strip PNG: at most this many frames of the first clip, upscaled this much.
STRIP_FRAMES = 12
STRIP_SCALE = 4
DEFAULT_BATCH_EPISODES = 8
# Reference rows (no model): the codec round trip (ceiling) and the retained frame copied over its
# block.
REFERENCE_ROWS: tuple[str, ...] = ("codec", "copy-retained")
# Frame subsets every row is scored on (retained: a block's last frame, kept in memory).
SUBSETS: tuple[str, ...] = ("all", "retained", "non_retained")


def one_step_label(level: float) -> str:
    """Row name of the one-step x0 prediction at few-step level ``level`` (e.g. ``one-step
    t=938``)."""
    return f"one-step t={level:.0f}"


@dataclass(frozen=True)
class ReconConfig:
    """Knobs of one run.

    Attributes:
        seed: noise seed (the same noise for every model).
        batch_size: clips run together at most.
        lpips: compute LPIPS (the slowest metric on CPU); off -> reported as null.
    """

    seed: int = 0
    batch_size: int = DEFAULT_BATCH_EPISODES
    lpips: bool = True


@dataclass
class ReconResult:
    """Per-frame scores ``scores[model][row][metric]``: float64 ``[episodes, N]``; plus strip
    frames."""

    episodes: list[BenchEpisode]
    clip_frames: int
    frames_per_block: int
    levels: list[float]
    scores: dict[str, dict[str, dict[str, np.ndarray]]]
    strip: dict[str, np.ndarray]  # label -> uint8 [n, H, W, 3] frames of the first clip


def clip_length(episodes: Sequence[BenchEpisode], frames_per_block: int, max_positions: int,
                requested: int | None = None) -> int:
    """Frames per clip: ``requested`` (else the shortest episode), in whole blocks, within the RoPE
    table."""
    shortest = min(ep.frames.shape[0] for ep in episodes)
    frames = shortest if requested is None else requested
    if requested is not None and requested > shortest:
        raise ConfigError(f"--clip-frames {requested} is longer than the shortest episode "
                          f"({shortest}"
                          " frames); ask for fewer frames")
    frames = min(frames, max_positions) // frames_per_block * frames_per_block
    if frames < frames_per_block:
        raise ConfigError(f"clips of {frames} frames hold no whole block of {frames_per_block} "
                          "frames; ask"
                          " for at least one block")
    return frames


def _noise(shape: tuple[int, ...], seeds: Sequence[int], draws: int) -> Tensor:
    """Per-clip CPU noise ``[draws, B, *shape]`` from each clip's seed: independent of batch and
    device."""
    per_clip = [torch.randn((draws, *shape),
                            generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(per_clip, 1)


@torch.no_grad()
def reconstruct(model: WanDiT, scheduler: FlowMatchScheduler, x0: Tensor, empty_context: Tensor,
                frames_per_block: int, seeds: Sequence[int],
                width_offsets: Tensor | None = None) -> dict[str, Tensor]:
    """Reconstructions ``{row: [B, N, C, H, W]}`` of clips ``x0: [B, N, C, H, W]`` from compressed
    memory.

    Rows: :func:`one_step_label` per few-step level (x0 prediction from ``x0`` noised to that level)
    and :data:`FEW_STEP` (the few-step sampler from pure noise). ``empty_context: [1 or B, L,
    text_dim]``; ``seeds``: one noise seed per clip; ``width_offsets: [B, N]`` for camera-anchored
    models.
    """
    batch, frames = x0.shape[:2]
    if len(seeds) != batch:
        raise InputError(f"reconstruct needs one noise seed per clip: {batch} clips, {len(seeds)} "
                         "seeds")
    device, dtype = x0.device, model.patch_embedding.weight.dtype
    x0 = x0.to(dtype)
    context = empty_context.to(device)
    if context.shape[0] == 1 and batch > 1:
        context = context.expand(batch, *context.shape[1:])
    mask = memory_training_mask(frames, frames_per_block, device=device)
    levels = scheduler.few_step_timesteps().tolist()
    # [levels, B, N, C, H, W]
    noise = _noise(tuple(x0.shape[1:]), seeds, len(levels)).to(device, dtype)
    eps = noise[0]

    def predict(x_t: Tensor, level: float) -> Tensor:
        t = torch.full((batch, frames), level, device=device)
        out = clean_noisy_forward(model, x0, x_t, t, context, mask, width_offsets=width_offsets)
        return scheduler.to_x0(out, x_t, t)

    rows: dict[str, Tensor] = {}
    for level in levels:
        t = torch.full((batch, frames), level, device=device)
        rows[one_step_label(level)] = predict(scheduler.add_noise(x0, eps, t), level)
    x = eps  # pure noise at the first level, as the streaming few-step sampler starts
    for step, level in enumerate(levels):
        pred = predict(x, level)
        if step + 1 == len(levels):
            x = pred
        else:
            t_next = torch.full((batch, frames), levels[step + 1], device=device)
            x = scheduler.add_noise(pred, noise[step + 1], t_next)
    rows[FEW_STEP] = x
    return rows


def _decode(codec: Codec, latents: Tensor) -> list[np.ndarray]:
    """Latents ``[B, N, C, h, w]`` -> per clip uint8 ``[T, H, W, 3]`` frames."""
    return [tensor_to_frames(v) for v in codec.decode(latents.float())]


def run_memory_recon(models: dict[str, WanDiT], preset: Preset, episodes: Sequence[BenchEpisode],
                     empty_contexts: dict[str, Tensor], clip_frames: int, config: ReconConfig, *,
                     progress: bool = True) -> ReconResult:
    """Reconstruct the first ``clip_frames`` frames of every episode with every model and score
    them.

    Args:
        models: name -> model run as a memory model (e.g. ``memory``, ``baseline``), same preset.
        empty_contexts: name -> ``[1, L, text_dim]`` empty-prompt embeddings of that model's text
        mode. clip_frames: frames per clip (whole blocks, see :func:`clip_length`).
    """
    from tqdm.auto import tqdm

    if not episodes:
        raise ConfigError("the memory benchmark needs at least one episode")
    if config.batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {config.batch_size}")
    block = preset.cache.frames_per_block
    codec = get_codec_for(preset.video)
    if codec.temporal_compression != 1:
        raise ConfigError("the memory benchmark scores latent blocks frame by frame, which needs "
                          "a codec"
                          f" without temporal compression; codec {codec.name!r} compresses time"
                          f" {codec.temporal_compression}x")
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    levels = scheduler.few_step_timesteps().tolist()
    row_names = [one_step_label(level) for level in levels] + [FEW_STEP]
    per_frame: dict[str, dict[str, list[dict[str, np.ndarray]]]] = {
        **{name: {row: [] for row in row_names} for name in models}, "codec": {"round trip": []},
        "copy-retained": {"retained frame": []}}
    # [N] each frame's retained frame
    retained = np.arange(clip_frames) // block * block + block - 1
    strip: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(episodes) * len(models), desc="memory reconstruction", unit="clip",
               disable=not progress)
    device = next(iter(models.values())).patch_embedding.weight.device
    for start in range(0, len(episodes), config.batch_size):
        chunk = list(range(start, min(start + config.batch_size, len(episodes))))
        truth = [episodes[i].frames[:clip_frames] for i in chunk]
        seeds = [config.seed * NOISE_SEED_STRIDE + i for i in chunk]
        x0 = codec.encode(torch.stack([frames_to_tensor(f) for f in truth]).to(device))
        for frames, target in zip(_decode(codec, x0), truth, strict=True):
            per_frame["codec"]["round trip"].append(score_pairs(frames, target,
                                                                with_lpips=config.lpips))
            per_frame["copy-retained"]["retained frame"].append(
                score_pairs(target[retained], target, with_lpips=config.lpips))
        offsets = _width_offsets(preset, [episodes[i] for i in chunk], clip_frames, device)
        if start == 0:
            strip["input"] = truth[0][:STRIP_FRAMES]
        for name, model in models.items():
            rows = reconstruct(model, scheduler, x0, empty_contexts[name], block, seeds, offsets)
            for row, latents in rows.items():
                decoded = _decode(codec, latents)
                for frames, target in zip(decoded, truth, strict=True):
                    per_frame[name][row].append(score_pairs(frames, target,
                                                            with_lpips=config.lpips))
                if start == 0 and row == FEW_STEP:
                    strip[name] = decoded[0][:STRIP_FRAMES]
            bar.update(len(chunk))
    bar.close()
    scores = {name: {row: {m: np.stack([e[m] for e in entries]) for m in METRICS}
                     for row, entries in rows_.items()} for name, rows_ in per_frame.items()}
    return ReconResult(list(episodes), clip_frames, block, levels, scores, strip)


def _width_offsets(preset: Preset, episodes: Sequence[BenchEpisode], frames: int,
                   device: torch.device) -> Tensor | None:
    """Camera positions in patches ``[B, frames]`` for camera-anchored presets, else None."""
    if not preset.dit.camera_rope:
        return None
    if any(ep.camera_px is None for ep in episodes):
        raise ConfigError("this model is camera-anchored (dit.camera_rope) and needs a camera "
                          "track per clip")
    track = torch.from_numpy(np.stack([ep.camera_px[:frames] for ep in episodes]))
    return (track / preset.dit.patch_size[2]).to(device)


# ---------------------------------------------------------------------------------------------
# Aggregation and report files


def _subset_mask(frames: int, frames_per_block: int, subset: str) -> np.ndarray:
    retained = np.arange(frames) % frames_per_block == frames_per_block - 1
    return {"all": np.ones(frames, dtype=bool), "retained": retained,
            "non_retained": ~retained}[subset]


def _row_summary(scores: dict[str, np.ndarray], frames_per_block: int) -> dict[str, Any]:
    """Means over episodes of per-episode means (PSNR: of the mean MSE), for every frame subset."""
    episodes, frames = scores["psnr"].shape
    out: dict[str, Any] = {}
    for subset in SUBSETS:
        mask = _subset_mask(frames, frames_per_block, subset)
        per_episode = {
            "psnr": [psnr_of_mean_mse(scores["psnr"][e], mask) for e in range(episodes)],
            "ssim": [float(np.nanmean(scores["ssim"][e][mask])) for e in range(episodes)],
            "lpips": [None if np.isnan(scores["lpips"][e][mask]).all() else float(np.nanmean(
                scores["lpips"][e][mask])) for e in range(episodes)],
        }
        entry = {
            m: (None if any(v is None for v in per_episode[m]) else float(np.mean(per_episode[m])))
            for m in METRICS
        }
        entry["frames"] = int(mask.sum()) * episodes
        if subset == "all":
            out.update(entry)
            out["per_episode_psnr"] = per_episode["psnr"]
        else:
            out[subset] = entry
    return out


def summarize(result: ReconResult) -> dict[str, Any]:
    """The JSON summary: per model (``models``) or reference (``references``) and row, PSNR / SSIM /
    LPIPS over all frames and per frame subset (``retained``, ``non_retained``)."""
    rows = {name: {row: _row_summary(scores, result.frames_per_block) for row,
                   scores in rows_.items()}
            for name, rows_ in result.scores.items()}
    return {
        "episodes": [ep.name for ep in result.episodes],
        "clip_frames": result.clip_frames,
        "frames_per_block": result.frames_per_block,
        "levels": result.levels,
        "target_psnr_db": TARGET_PSNR_DB,
        "models": {name: entry for name, entry in rows.items() if name not in REFERENCE_ROWS},
        "references": {name: entry for name, entry in rows.items() if name in REFERENCE_ROWS},
    }


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_summary(summary: dict[str, Any]) -> str:
    """One table: model x reconstruction, PSNR / SSIM / LPIPS over all and non-retained frames."""
    lines = [f"# Memory reconstruction ({len(summary['episodes'])} held-out clips of "
             f"{summary['clip_frames']}"
             f" frames, blocks of {summary['frames_per_block']})", "",
             "Each block is reconstructed from the compressed memory (the last frame of every "
             "block up to its"
             " own) with the empty prompt. non-retained: the block's other frames, which only the "
             "memory"
             f" model's compression can bring back. Target: few-step PSNR >= {TARGET_PSNR_DB:g} "
             "dB on tiny."
             " codec: the input's codec round trip (the ceiling); copy-retained: each block's "
             "retained"
             " frame repeated over the block (no reconstruction).", "",
             "| model | reconstruction | PSNR | SSIM | LPIPS | PSNR non-retained | SSIM "
             "non-retained"
             " | LPIPS non-retained |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in {**summary["models"], **summary["references"]}.items():
        for row, entry in rows.items():
            rest = entry["non_retained"]
            cells = [_fmt(entry["psnr"], 2), _fmt(entry["ssim"], 3), _fmt(entry["lpips"], 3),
                     _fmt(rest["psnr"], 2), _fmt(rest["ssim"], 3), _fmt(rest["lpips"], 3)]
            lines.append(f"| {name} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, result: ReconResult, config: ReconConfig,
                  metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md`` and ``strip.png`` (input | each model's few-step
    reconstruction of the first clip) into ``out_dir``; return the summary."""

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror}") from err
    summary = {**summarize(result), "config": asdict(config), "metadata": metadata}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown_summary(summary))
    first = result.episodes[0].name
    labels = [f"input, clip {first}, frames 0..{len(result.strip['input']) - 1}"]
    labels += [
        f"{name}: {FEW_STEP} from compressed memory" for name in result.strip if name != "input"
    ]
    write_png_strip(out / "strip.png", list(result.strip.values()), labels, scale=STRIP_SCALE)
    return summary

