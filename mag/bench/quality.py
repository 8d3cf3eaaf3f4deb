"""``mag bench quality``: how close are a model's samples to real panorama-world clips?

Each model samples one clip per held-out real clip (same prompt, same camera track) and the set is
scored: ``fd`` (Fréchet distance of AlexNet features, the quality figure), ``psnr`` / ``ssim``
against the paired real clip (a copying reference, not a score), beside a ``real vs real`` row from
a disjoint set of real clips. The sampler follows the model's stage; noise is drawn per clip or per
chunk from fixed seeds, so a clip's sample does not depend on the batch. Protocol and results:
docs/training.md, "Sample quality".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mag.bench.lpips import alexnet_pooled_features
from mag.bench.metrics import frechet_distance, psnr, ssim, summarize_psnr
from mag.codecs import get_codec_for, tensor_to_frames
from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.io import files
from mag.io.video import write_png_strip
from mag.models.dit import WanDiT
from mag.objectives.ode import sample_ode_trajectory
from mag.pipelines import SAMPLERS, SamplerConfig, StreamingGenerator, policy_from_name
from mag.schedulers import FlowMatchScheduler
from mag.world import WorldConfig, camera_track, episode_seed, make_clip

__all__ = ["DEFAULT_FRAMES", "FEATURE_MIN_SIDE", "REAL_VS_REAL", "ModelRun", "RealClips",
           "feature_images", "markdown_summary", "parse_sampler_spec", "real_clips", "row_name",
           "sample_model", "sampler_for_stage", "sampler_overrides", "score_set", "write_json",
           "write_samples"]

# Frames per clip: the tiny chain's training clip length (recipes' data.clip_frames).
DEFAULT_FRAMES = 12
DEFAULT_CLIPS = 64
# Euler steps of the teacher's ODE (the ODE-pairs recipe's count; a multiple of the few-step grid).
DEFAULT_TEACHER_STEPS = 48
# Classifier-free guidance of the teacher: recipes/tiny-dmd.toml dmd.guidance_scale (its real
# score).
DMD_GUIDANCE_SCALE = 4.0
# Guidance of streamed students (1 = off: DMD students are distilled with guidance baked in).
STREAM_GUIDANCE_SCALE = 1.0
# Frames are upscaled (nearest, integer factor) to at least this side before AlexNet: 16-px frames
# are below its minimum input (31 px), 64 px gives a 3x3 conv5 map.
FEATURE_MIN_SIDE = 64
DEFAULT_BATCH_CLIPS = 32
# Noise seeds: clip i (teacher) or the chunk starting at clip i (streaming) draws from seed * stride
# + i.
NOISE_SEED_STRIDE = 1_000_003
REAL_VS_REAL = "real vs real"
REAL_ROW = "real"
BIDIRECTIONAL_STAGES: tuple[str, ...] = ("teacher",)
STREAMING_STAGES: tuple[str, ...] = ("causal", "dmd", "mag-generator")
# samples.png: the first clips, each as a row of real frames then one row per model, upscaled.
SAMPLE_CLIPS = 3
SAMPLE_SCALE = 4
UINT8_MAX = 255.0


# ---------------------------------------------------------------------------------------------
# Real clips


@dataclass(frozen=True, eq=False)
class RealClips:
    """Held-out real clips: uint8 ``frames [N, F, H, W, 3]``, float32 ``camera_px [N, F]``
    (unwrapped camera track in pixels, relative to frame 0), their ``prompts`` and split
    ``indices``."""

    frames: np.ndarray
    camera_px: np.ndarray
    prompts: list[str]
    indices: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


def real_clips(world: WorldConfig, split: str, start: int, count: int, frames: int) -> RealClips:
    """Clips ``start .. start+count-1`` of ``split``: world seed of that index, ``frames`` frames
    each."""
    if count < 1:
        raise ConfigError(f"the quality benchmark needs at least one clip, got {count}")
    clips = [make_clip(episode_seed(split, i), frames, world) for i in range(start, start + count)]
    return RealClips(
        frames=np.stack([c.frames for c in clips]),
        camera_px=np.stack([camera_track(c.velocities) for c in clips]).astype(np.float32),
        prompts=[c.prompt for c in clips],
        indices=list(range(start, start + count)),
    )


# ---------------------------------------------------------------------------------------------
# Samplers


def parse_sampler_spec(spec: str) -> SamplerConfig:
    """``KIND[:STEPS[:GUIDANCE]]`` (e.g. ``euler:8``, ``few_step``, ``euler:48:4``) -> a
    SamplerConfig."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or parts[0] not in SAMPLERS:
        raise ConfigError(f"sampler {spec!r} is not KIND[:STEPS[:GUIDANCE]] with KIND one of"
                          f" {', '.join(SAMPLERS)}; e.g. euler:8 or few_step")
    try:
        steps = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        guidance = float(parts[2]) if len(parts) > 2 else STREAM_GUIDANCE_SCALE
    except ValueError as err:
        raise ConfigError(
            f"sampler {spec!r}: STEPS must be an int and GUIDANCE a number ({err})"
        ) from err
    return SamplerConfig(parts[0], steps, guidance).validate()  # type: ignore[arg-type]


def sampler_for_stage(stage: str, override: SamplerConfig | None, teacher: SamplerConfig,
                      streaming: SamplerConfig) -> SamplerConfig:
    """The sampler of a model of ``stage``: ``override`` if given, else the teacher's or the
    streaming default. A teacher integrates its ODE with Euler steps only (it has no few-step
    list)."""
    if stage in BIDIRECTIONAL_STAGES:
        chosen = override or teacher
        if chosen.kind != "euler":
            raise ConfigError(f"a {stage} model is sampled bidirectionally with Euler steps, not"
                              f" {chosen.kind!r}; give it euler:STEPS[:GUIDANCE]")
        return chosen.validate()
    if stage in STREAMING_STAGES:
        return (override or streaming).validate()
    raise ConfigError(f"stage {stage!r} has no sampler here; the quality benchmark samples"
                      f" {', '.join(BIDIRECTIONAL_STAGES + STREAMING_STAGES)} models")


def _width_offsets(preset: Preset, camera_px: np.ndarray, device: torch.device) -> Tensor | None:
    """``[B, F]`` camera positions in patches for camera-anchored models, else None."""
    if not preset.dit.camera_rope:
        return None
    return (torch.from_numpy(camera_px) / preset.dit.patch_size[2]).to(device)


@torch.no_grad()
def sample_model(model: WanDiT, preset: Preset, stage: str, sampler: SamplerConfig,
                 clips: RealClips, encode_prompts: Callable[[list[str]], Tensor], *, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH_CLIPS, progress: bool = False) -> np.ndarray:
    """One sample per real clip (its prompt and camera track): uint8 ``[N, F, H, W, 3]``.

    ``encode_prompts``: prompts -> ``[B, L, text_dim]`` embeddings in the model's text mode (the
    empty prompt gives the unconditional branch). ``stage`` picks bidirectional (teacher) or
    streaming sampling.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    frames = clips.frames.shape[1]
    block = preset.cache.frames_per_block
    if frames % block or frames > preset.dit.rope_max_positions:
        raise ConfigError(f"clips of {frames} frames: need whole blocks of {block} frames and at "
                          "most"
                          f" dit.rope_max_positions={preset.dit.rope_max_positions}")
    codec = get_codec_for(preset.video)
    if codec.temporal_compression != 1:
        raise ConfigError(f"the quality benchmark samples latent frames one per video frame; codec"
                          f" {codec.name!r} compresses time {codec.temporal_compression}x")
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    device = model.patch_embedding.weight.device
    dtype = model.patch_embedding.weight.dtype
    latent = (preset.video.latent_channels, preset.video.latent_height, preset.video.latent_width)
    bidirectional = stage in BIDIRECTIONAL_STAGES
    gen = None if bidirectional else StreamingGenerator(model, scheduler, preset,
                                                        policy_from_name("full", preset),
                                                        sampler=sampler)
    out = []
    bar = tqdm(total=len(clips), desc=f"sampling ({stage})", unit="clip", disable=not progress)
    for start in range(0, len(clips), batch_size):
        chunk = range(start, min(start + batch_size, len(clips)))
        context = encode_prompts([clips.prompts[i] for i in chunk]).to(device, dtype)
        uncond = encode_prompts([""]).to(device, dtype).expand_as(context)
        offsets = _width_offsets(preset, clips.camera_px[chunk.start:chunk.stop], device)
        if gen is None:
            noise = torch.stack([torch.randn((frames, *latent),
                                             generator=torch.Generator().manual_seed(
                seed * NOISE_SEED_STRIDE + i)) for i in chunk]).to(device, dtype)
            _, x0 = sample_ode_trajectory(model, scheduler, noise, context, uncond, sampler.steps,
                                          guidance_scale=sampler.guidance_scale,
                                          width_offsets=offsets)
        else:
            noise_gen = torch.Generator(device=device).manual_seed(
                seed * NOISE_SEED_STRIDE + chunk.start
            )
            gen.reset(batch_size=len(chunk), horizon_frames=frames)
            gen.set_prompt(context, uncond if sampler.uses_guidance else None)
            blocks = [
                gen.generate_block(
                    noise_gen, None if offsets is None else offsets[:, b : b + block]
                )
                for b in range(0, frames, block)
            ]
            x0 = torch.cat(blocks, dim=1)
        out.extend(tensor_to_frames(video) for video in codec.decode(x0.float()))
        bar.update(len(chunk))
    bar.close()
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# Scores


def feature_images(frames: np.ndarray) -> Tensor:
    """uint8 ``[N, F, H, W, 3]`` -> float ``[N*F, 3, s*H, s*W]`` in [0, 1], nearest-upscaled by the
    smallest integer ``s`` with ``s * min(H, W) >= FEATURE_MIN_SIDE`` (AlexNet's input for the
    Fréchet distance)."""
    if frames.ndim != 5 or frames.dtype != np.uint8:
        raise InputError(f"expected uint8 frames [N, F, H, W, 3], found {frames.dtype} "
                         f"{list(frames.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(frames.reshape(-1, *frames.shape[2:]))).permute(0, 3,
                                                                                              1, 2)
    scale = max(1, math.ceil(FEATURE_MIN_SIDE / min(frames.shape[2:4])))
    x = x.float() / UINT8_MAX
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


def _pairs(frames: np.ndarray) -> Tensor:
    """uint8 ``[N, F, H, W, 3]`` -> float ``[N, F, 3, H, W]`` in [0, 1] for the per-frame
    metrics."""
    return torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / UINT8_MAX


def score_set(generated: np.ndarray, real: np.ndarray,
              real_features: Tensor | None = None) -> dict[str, Any]:
    """FD of ``generated`` vs ``real`` frames (both uint8 ``[N, F, H, W, 3]``, same N, F) and mean
    PSNR / SSIM of generated clip ``i`` vs real clip ``i``. ``real_features``: ``[N*F, 256]``
    AlexNet features of ``real`` if already computed (the same real set scores every model)."""
    if generated.shape != real.shape:
        raise InputError(f"generated clips {list(generated.shape)} and real clips "
                         f"{list(real.shape)} must"
                         " have the same shape (one sample per real clip)")
    feats = (
        real_features
        if real_features is not None
        else alexnet_pooled_features(feature_images(real))
    )
    fd = float(frechet_distance(alexnet_pooled_features(feature_images(generated)), feats))
    gen, ref = _pairs(generated), _pairs(real)
    db = summarize_psnr(psnr(gen, ref))
    return {"fd": fd, "psnr": db.mean_db if math.isfinite(db.mean_db) else None,
            "psnr_identical_frames": db.num_identical, "ssim": float(ssim(gen, ref).mean()),
            "samples": int(generated.shape[0]),
            "frames": int(generated.shape[0] * generated.shape[1])}


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelRun:
    """One model row: what was run (``record``: source, stage, recipe, training steps, commit), how,
    and its scores."""

    name: str
    stage: str
    sampler: SamplerConfig
    record: dict[str, Any]
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        mode = (
            "bidirectional" if self.stage in BIDIRECTIONAL_STAGES else "streaming (full KV cache)"
        )
        return {**self.scores, "stage": self.stage, "mode": mode, "sampler": self.sampler.kind,
                "steps": self.steps, "guidance_scale": self.sampler.guidance_scale,
                "seconds": round(self.seconds, 1), "model": self.record}

    @property
    def steps(self) -> int:
        """Network evaluations per denoised frame (per branch): Euler steps or the few-step list
        length."""
        if self.sampler.kind == "euler":
            return self.sampler.steps
        return len(self.record.get("few_step_levels", []))


def row_name(spec: str, meta: dict[str, Any]) -> str:
    name = meta.get("name")
    return spec if not Path(spec).suffix else str(name or Path(spec).stem)


def sampler_overrides(items: Sequence[str]) -> dict[str, SamplerConfig]:
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--sampler-for {item!r} is not MODEL=KIND[:STEPS[:GUIDANCE]], e.g."
                              " tiny-causal-long=euler:8")
        out[name] = parse_sampler_spec(spec)
    return out


# ---------------------------------------------------------------------------------------------
# Report files


def fmt_value(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_summary(summary: dict[str, Any]) -> str:
    """One table: FD (the quality figure) and, for reference, PSNR / SSIM vs the real clip, per
    row."""
    clips, split, frames = summary["clips"], summary["split"], summary["frames"]
    title = f"# Sample quality ({clips} {split} clips of {frames} frames)"
    lines = [title, "",
             "FD: Fréchet distance of AlexNet pooled conv5 features (LPIPS AlexNet, frames "
             "nearest-upscaled"
             f" x{summary['feature_scale']}) of all generated vs all real frames; lower is better."
             " PSNR / SSIM: generated clip i vs real clip i (same prompt and camera track): they "
             "measure"
             " copying the real clip, not quality. real vs real: a disjoint real set of the same "
             "size (the"
             " FD noise floor).", "",
             "| row | stage | sampler | steps | CFG | samples | FD | PSNR | SSIM | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in {**summary["models"], **summary["references"]}.items():
        cells = [row.get("stage", "-"), row.get("sampler", "-"), str(row.get("steps", "-")),
                 fmt_value(row.get("guidance_scale"), 1), f"{row['samples']} x {summary['frames']}",
                 fmt_value(row["fd"], 2), fmt_value(row["psnr"], 2), fmt_value(row["ssim"], 3),
                 fmt_value(row.get("seconds"), 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any) -> None:
    files.write_json(path, data, indent=1)


def write_samples(path: Path, real: RealClips, samples: dict[str, np.ndarray]) -> None:
    """A grid: for each of the first clips, the real frames then each model's sample, left to
    right."""

    rows, labels = [], []
    for i in range(min(SAMPLE_CLIPS, len(real))):
        rows.append(real.frames[i])
        labels.append(f"real clip {real.indices[i]}: {real.prompts[i]}")
        for name, frames in samples.items():
            rows.append(frames[i])
            labels.append(f"{name}, clip {real.indices[i]}")
    write_png_strip(path, rows, labels, scale=SAMPLE_SCALE)
