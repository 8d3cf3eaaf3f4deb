"""``mag bench quality`` on the command line: options, validation, models, the run and its files."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mag.app import machine_info, model_record, recipe_data, text_cache
from mag.bench.lpips import alexnet_pooled_features
from mag.bench.quality import (
    BIDIRECTIONAL_STAGES,
    DEFAULT_BATCH_CLIPS,
    DEFAULT_CLIPS,
    DEFAULT_FRAMES,
    DEFAULT_TEACHER_STEPS,
    DMD_GUIDANCE_SCALE,
    FEATURE_MIN_SIDE,
    REAL_VS_REAL,
    STREAM_GUIDANCE_SCALE,
    ModelRun,
    feature_images,
    fmt_value,
    markdown_summary,
    real_clips,
    row_name,
    sample_model,
    sampler_for_stage,
    sampler_overrides,
    score_set,
    write_json,
    write_samples,
)
from mag.checkpoint import git_commit
from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.io.cli import (
    add_dtype_argument,
    add_out_argument,
    add_runtime_arguments,
    dtype_from_args,
    set_threads,
)
from mag.io.files import write_text
from mag.io.paths import check_output_dir
from mag.models.dit import WanDiT
from mag.objectives.ode import few_step_indices
from mag.pipelines import SAMPLERS, SamplerConfig
from mag.registry import GENERATOR_STAGES, load_model, model_stage
from mag.schedulers import FlowMatchScheduler
from mag.train.data import preset_world


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mag bench quality``."""
    parser.add_argument("--models", required=True,
                        help="comma-separated generators (shipped names, model files or "
                             "checkpoints), e.g."
                             " tiny-teacher,tiny-dmd,tiny-causal-long")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="held-out world "
                                                                                "split")
    parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS,
                        help="clips per set (real clips 0..N-1 and samples; real vs real also "
                             "uses N..2N-1)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per clip "
                                                                           "(whole blocks)")
    parser.add_argument("--world", default=None,
                        help="named world config (default: the first model's training world)")
    parser.add_argument("--steps", type=int, default=DEFAULT_TEACHER_STEPS,
                        help="Euler steps of the teacher (must land on the few-step levels), and "
                             "of the"
                             " streaming models under --sampler euler")
    parser.add_argument("--guidance-scale", type=float, default=DMD_GUIDANCE_SCALE,
                        help="classifier-free guidance of the teacher (default: the DMD recipe's)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="few_step",
                        help="sampler of the streaming models (causal, dmd, mag-generator)")
    parser.add_argument("--stream-guidance-scale", type=float, default=STREAM_GUIDANCE_SCALE,
                        help="classifier-free guidance of the streaming models (1 = off)")
    parser.add_argument("--sampler-for", action="append", default=[],
                        metavar="MODEL=KIND[:STEPS[:CFG]]",
                        help="one model's sampler, e.g. tiny-causal-long=euler:8 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_CLIPS, help="clips "
                                                                                    "sampled "
                                                                                    "together")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (the same for every model)")
    add_runtime_arguments(parser)
    add_dtype_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_out_argument(parser, "output folder (summary.json, summary.md, samples.png)")


def run_quality_cli(args: argparse.Namespace) -> int:
    """``mag bench quality``: load and check every model first, then sample and score each."""

    started = time.time()
    set_threads(args.threads)
    check_output_dir(args.out)  # before any model or clip
    if args.clips < 2:
        raise ConfigError(f"--clips must be at least 2 (a Fréchet distance needs a covariance), got"
                          f" {args.clips}")
    specs = [m.strip() for m in args.models.split(",") if m.strip()]
    if not specs:
        raise ConfigError("--models is empty; give e.g. tiny-teacher,tiny-dmd,tiny-causal-long")
    overrides = sampler_overrides(args.sampler_for)
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        raise ConfigError(f"--sampler-for names {', '.join(unknown)}, which --models does not list"
                          f" ({', '.join(specs)})")
    teacher = SamplerConfig("euler", args.steps, args.guidance_scale).validate()
    streaming = SamplerConfig(args.sampler, args.steps if args.sampler == "euler" else 0,
                              args.stream_guidance_scale).validate()
    loaded: list[tuple[ModelRun, WanDiT, Preset, dict[str, Any]]] = []
    for spec in specs:
        model, preset, meta = load_model(spec, device=args.device, expect_stage=GENERATOR_STAGES)
        model = model.to(dtype_from_args(args))
        stage = model_stage(meta) or "causal"
        name = row_name(spec, meta)
        if any(run.name == name for run, *_ in loaded):
            raise ConfigError(f"model {name!r} is listed twice in --models; list each model once")
        scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
        record = {**model_record(spec, meta), "training_world": recipe_data(meta).get("world"),
                  "few_step_levels": scheduler.few_step_timesteps().tolist()}
        sampler = sampler_for_stage(stage, overrides.get(spec), teacher, streaming)
        if stage in BIDIRECTIONAL_STAGES:

            # refuse an off-grid step count before sampling
            few_step_indices(scheduler, sampler.steps)
        loaded.append((ModelRun(name, stage, sampler, record), model, preset, meta))
    first_preset, first_meta = loaded[0][2], loaded[0][3]
    for run, _, preset, _ in loaded[1:]:
        if preset.video != first_preset.video:
            raise ConfigError(f"{run.name} makes {preset.video.height}x{preset.video.width} frames,"
                              f" {loaded[0][0].name} "
                              f"{first_preset.video.height}x{first_preset.video.width};"
                              " the models of one call share the real clips: run them in separate "
                              "calls")
    block = first_preset.cache.frames_per_block
    if args.frames < block or args.frames % block:
        raise ConfigError(f"--frames {args.frames} must be a positive multiple of the block size "
                          f"({block})")
    training_world = recipe_data(first_meta).get("world") or None
    world = preset_world(first_preset, None if args.world else training_world,
                         args.world or "default")
    source = f"--world {args.world}" if args.world else f"{loaded[0][0].name} recipe.data.world"
    real = real_clips(world, args.split, 0, args.clips, args.frames)
    other = real_clips(world, args.split, args.clips, args.clips, args.frames)
    real_features = alexnet_pooled_features(feature_images(real.frames))
    references = {REAL_VS_REAL: score_set(other.frames, real.frames, real_features)}
    samples: dict[str, np.ndarray] = {}
    for run, model, preset, meta in loaded:
        text = text_cache(preset, meta)
        run.record["world_matches_training"] = (args.world is None and
                                                recipe_data(meta).get("world") == training_world)
        began = time.time()
        samples[run.name] = sample_model(model, preset, run.stage, run.sampler, real, text.get,
                                         seed=args.seed, batch_size=args.batch_size,
                                         progress=not args.no_progress)
        run.seconds = time.time() - began
        run.scores = score_set(samples[run.name], real.frames, real_features)
        print(f"{run.name:>18}: FD {run.scores['fd']:.2f}, PSNR "
              f"{fmt_value(run.scores['psnr'], 2)} dB,"
              f" SSIM {run.scores['ssim']:.3f} ({run.sampler.kind} {run.steps} steps, "
              f"{run.seconds:.0f} s)")
    print(f"{REAL_VS_REAL:>18}: FD {references[REAL_VS_REAL]['fd']:.2f}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror}") from err
    summary = {
        "clips": args.clips, "frames": args.frames, "split": args.split,
        "real_clip_indices": [0, args.clips], "real_vs_real_indices": [args.clips, 2 * args.clips],
        "feature": "LPIPS AlexNet conv5 relu, global average pooled (256-d)",
        "feature_scale": max(1, math.ceil(FEATURE_MIN_SIDE / min(real.frames.shape[2:4]))),
        "models": {run.name: run.to_json() for run, *_ in loaded},
        "references": references,
        "metadata": {
            "command": shlex.join(["mag", *sys.argv[1:]]), "commit": git_commit(),
            "machine": machine_info(args.device), "preset": first_preset.to_dict(),
            "seed": args.seed, "batch_size": args.batch_size,
            "world": {"source": source, "config": dataclasses.asdict(world)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
        },
    }
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", markdown_summary(summary))
    write_samples(out / "samples.png", real, samples)
    print(f"wrote {out / 'summary.json'} ({args.clips} {args.split} clips,"
          f" {summary['metadata']['seconds']} s)")
    return 0
