"""MAG-Bench's own protocol (``mag bench consistency --protocol magbench``), beside the
frame-aligned one.

Per clip, as the official MAG-Bench evaluation does: the video is cut to whole latent blocks, the
switch falls at 75 % of its frames rounded up to a block, the history is VAE-encoded and fed to the
cache, the rest is generated, the whole latent video (encoded history + generated blocks) is decoded
at once, and each generated frame is scored against the ground-truth frame of the return segment
nearest to it by LPIPS (AlexNet, spatial mode, averaged); PSNR and SSIM are taken on those matched
pairs. Every policy sees the same noise. How it differs from the frame-aligned protocol:
docs/benchmark.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mag.bench.consistency.episodes import resize_frames
from mag.bench.consistency.report import write_json
from mag.bench.consistency.run import build_policies
from mag.bench.consistency.scores import PSNR_CAP_DB, ConsistencyConfig, config_record
from mag.bench.lpips import MIN_IMAGE_SIDE, lpips_matrix
from mag.bench.metrics import psnr, ssim
from mag.codecs import Codec, frames_to_tensor, get_codec_for
from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.io.video import read_mp4
from mag.models.dit import WanDiT
from mag.pipelines import StreamingGenerator
from mag.schedulers import FlowMatchScheduler

SWITCH_FRACTION = 0.75  # MAG-Bench switches from history to generation at 75 % of each clip
# optional: video file name -> prompt (the official default is no prompt)
PROMPTS_FILE = "prompts.json"
MAGBENCH_METRICS = ("lpips", "psnr", "ssim")
# clip i of seed s draws from seed s * stride + i, as the frame-aligned runner
NOISE_SEED_STRIDE = 1_000_003


@dataclass(frozen=True, eq=False)
class MagBenchClip:
    """One MAG-Bench clip at the model's frame size.

    Attributes:
        name: the video's path relative to the folder.
        frames: uint8 ``[T, H, W, 3]``, cut to whole latent blocks.
        switch_frame: frames ``[0, switch_frame)`` are the history, the rest the return segment.
        prompt: text prompt ("" unless the folder's prompts.json names one).
    """

    name: str
    frames: np.ndarray
    switch_frame: int
    prompt: str = ""


@dataclass(frozen=True)
class ClipScores:
    """A clip's scores: means over its generated frames, and the ground-truth frame each was matched
    to."""

    lpips: float
    psnr: float
    ssim: float
    matched: list[int]


def magbench_cut(num_frames: int, temporal_compression: int, frames_per_block: int) -> tuple[int,
                                                                                             int]:
    """``(frames kept, switch frame)`` of a clip of ``num_frames`` video frames.

    Latent frames ``L`` decode to ``c L - (c - 1)`` video frames (``c``: the codec's temporal
    compression, the first latent frame holding one). The clip keeps the most whole blocks of
    ``frames_per_block`` latent frames that fit; the switch is the first block boundary at or after
    ``floor(0.75 T)``. With the Wan VAE (``c = 4``) and 3-frame blocks these are the official ``(T +
    3) // 12 * 12 - 3`` and ``ceil((floor(0.75 T) + 3) / 12) * 12 - 3``.
    """
    c, k = temporal_compression, frames_per_block
    kept_latents = (num_frames + c - 1) // c // k * k
    switch_latents = max(
        k, math.ceil((math.floor(SWITCH_FRACTION * num_frames) + c - 1) / (c * k)) * k
    )
    if switch_latents >= kept_latents:
        raise InputError(f"a clip of {num_frames} frames leaves no whole block of {k} latent "
                         "frames after its"
                         f" switch at {SWITCH_FRACTION:.0%}; MAG-Bench needs longer clips")
    return c * kept_latents - (c - 1), c * switch_latents - (c - 1)


def _prompts(folder: Path) -> dict[str, str]:
    path = folder / PROMPTS_FILE
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise InputError(f"{path} must be a JSON object mapping video file names to prompt strings")
    return table


def magbench_clips(folder: str | Path, preset: Preset,
                   temporal_compression: int) -> list[MagBenchClip]:
    """Every ``*.mp4`` under ``folder`` (sorted) as a MAG-Bench clip, resized to the preset's frame
    size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--videos expects a folder of mp4 files; {folder} is not a folder")
    paths = sorted(folder.rglob("*.mp4"))
    if not paths:
        raise InputError(f"{folder} holds no .mp4 files")
    prompts = _prompts(folder)
    out = []
    for path in paths:
        name = path.relative_to(folder).as_posix()
        frames = resize_frames(read_mp4(path), preset.video.height, preset.video.width)
        try:
            kept, switch = magbench_cut(frames.shape[0], temporal_compression,
                                        preset.cache.frames_per_block)
        except InputError as err:
            raise InputError(f"{name}: {err}") from None
        out.append(MagBenchClip(name, frames[:kept], switch, prompts.get(name, "")))
    return out


def _upsampled(x: Tensor) -> Tensor:
    """Frames upsampled (nearest, integer factor) to at least AlexNet's minimum side."""
    side = min(x.shape[-2:])
    factor = math.ceil(MIN_IMAGE_SIDE / side) if side < MIN_IMAGE_SIDE else 1
    return torch.nn.functional.interpolate(x, scale_factor=factor,
                                           mode="nearest") if factor > 1 else x


def score_nearest(generated: Tensor, truth: Tensor) -> ClipScores:
    """Match each generated frame to its LPIPS-nearest ground-truth frame and score the pairs.

    ``generated [n, 3, H, W]``, ``truth [m, 3, H, W]`` in [0, 1]; ``matched`` indexes ``truth``.
    """
    distances = lpips_matrix(_upsampled(generated), _upsampled(truth))
    nearest, matched = distances.min(dim=1)
    pairs = truth[matched]
    return ClipScores(lpips=float(nearest.mean()),
                      psnr=float(psnr(generated, pairs).double().clamp_max(PSNR_CAP_DB).mean()),
                      ssim=float(ssim(generated, pairs).double().mean()), matched=matched.tolist())


def generate_clip(gen: StreamingGenerator, codec: Codec, clip: MagBenchClip, context: Tensor,
                  noise: torch.Generator) -> Tensor:
    """Feed the encoded history, generate the rest; the return segment of the whole-video decode.

    Returns float ``[T - switch_frame, 3, H, W]`` in [0, 1].
    """
    latents = codec.encode(frames_to_tensor(clip.frames)[None].to(gen.device))
    history = codec.latent_frames(clip.switch_frame)
    gen.reset(1, latents.shape[1])
    gen.set_prompt(context)
    gen.feed(latents[:, :history])
    blocks = [gen.generate_block(noise) for _ in range(history, latents.shape[1],
                                                       gen.frames_per_block)]
    video = codec.decode(torch.cat([latents[:, :history], *[b.to(latents.dtype) for b in blocks]],
                                   1))
    return ((video[0, clip.switch_frame:].float().clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()


def run_magbench(model: WanDiT, preset: Preset, clips: Sequence[MagBenchClip],
                 encode_prompts: Callable[[list[str]], Tensor], config: ConsistencyConfig, *,
                 memory_model: WanDiT | None = None, empty_context: Tensor | None = None,
                 codec: Codec | None = None) -> dict[str, list[ClipScores]]:
    """Every policy of ``config`` on every clip: policy -> per-clip scores (clip order)."""
    if not clips:
        raise ConfigError("the benchmark needs at least one clip")
    policies = build_policies(config.policies, preset, memory_model=memory_model,
                              empty_context=empty_context)
    codec = codec if codec is not None else get_codec_for(preset.video)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    rows: dict[str, list[ClipScores]] = {}
    for name, (policy, writer) in policies.items():
        gen = StreamingGenerator(model, scheduler, preset, policy, sampler=config.sampler,
                                 writer=writer)
        rows[name] = []
        for index, clip in enumerate(clips):
            noise = torch.Generator(device=gen.device).manual_seed(
                config.seed * NOISE_SEED_STRIDE + index
            )
            context = encode_prompts([clip.prompt]).to(gen.device)
            generated = generate_clip(gen, codec, clip, context, noise)
            truth = frames_to_tensor(clip.frames[clip.switch_frame:]).add(1.0).div(2.0)
            rows[name].append(score_nearest(generated, truth))
    return rows


def magbench_summary(clips: Sequence[MagBenchClip], rows: dict[str, list[ClipScores]]) -> dict[str,
                                                                                               Any]:
    """Per policy: the metric means over clips (as the official ``avg_results``) and each clip's
    scores."""
    policies = {}
    for name, scores in rows.items():
        means = {m: float(np.mean([getattr(s, m) for s in scores])) for m in MAGBENCH_METRICS}
        per_clip = [{"video": clip.name, "frames": int(clip.frames.shape[0]),
                     "switch_frame": clip.switch_frame, **{m: getattr(s,
                                                                      m) for m in MAGBENCH_METRICS},
                     "matched_frames": [clip.switch_frame + j for j in s.matched]}
                    for clip, s in zip(clips, scores, strict=True)]
        policies[name] = {**means, "clips": per_clip}
    return {"protocol": "magbench", "policies": policies}


def write_magbench_results(out_dir: str | Path, clips: Sequence[MagBenchClip],
                           rows: dict[str, list[ClipScores]], config: ConsistencyConfig,
                           metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` (:func:`magbench_summary` + config + metadata) and ``summary.md``."""
    summary = {**magbench_summary(clips, rows), "config": config_record(config),
               "metadata": metadata}
    out = Path(out_dir)
    write_json(out / "summary.json", summary)
    lines = [f"# MAG-Bench protocol, {len(clips)} clips", "", "| policy | LPIPS | PSNR (dB) | "
                                                              "SSIM |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {row['lpips']:.4f} | {row['psnr']:.2f} | {row['ssim']:.4f} |"
              for name, row in summary["policies"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
