"""``mag bench consistency``: the MAG-Bench-style consistency benchmark from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mag.app import (
    add_memory_cache_arguments,
    add_model_flags,
    cache_overrides,
    empty_context,
    load_memory_for,
    machine_info,
    model_record,
    recipe_data,
    text_cache,
)
from mag.bench.consistency import (
    ConsistencyConfig,
    bench_world,
    build_policies,
    run_consistency,
    video_episodes,
    world_episodes,
    write_results,
)
from mag.bench.consistency.magbench import magbench_clips, run_magbench, write_magbench_results
from mag.bench.memory_recon import FEW_STEP, ReconConfig, clip_length, run_memory_recon
from mag.bench.memory_recon import write_results as write_recon_results
from mag.bench.quality_cli import add_quality_arguments, run_quality_cli
from mag.bench.speed import add_speed_arguments, run_speed_cli
from mag.checkpoint import git_commit
from mag.codecs import get_codec_for
from mag.config import get_preset
from mag.errors import ConfigError
from mag.io.cli import add_out_argument, add_runtime_arguments, dtype_from_args, set_threads
from mag.io.paths import check_output_dir
from mag.memory import check_memory_model, load_memory_model
from mag.models import WanDiT
from mag.pipelines import SamplerConfig, load_generator
from mag.real_weights import add_real_weights_arguments, pipeline_from_args, uses_real_weights
from mag.registry import GENERATOR_STAGES, load_model
from mag.world import NUM_TEST_EPISODES

MEMORY_DESCRIPTION = ("Reconstruct every block of held-out world clips from the memory model's "
                      "compressed"
                      " memory"
                      " (the last frame of each block) with the empty prompt, one step per "
                      "few-step level and"
                      " with the full few-step sampler, and score them against the input blocks.")
FRAME_ALIGNED, MAGBENCH = "frame-aligned", "magbench"
PROTOCOLS = (FRAME_ALIGNED, MAGBENCH)
# Seed of the untrained model used when no --model is given (a floor, not a result).
RANDOM_MODEL_SEED = 0


@dataclass(frozen=True)
class Benchmark:
    """One ``mag bench`` subcommand: its options and what runs it."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: consistency, memory, speed, quality",
                                  description="Benchmarks of memory, consistency, speed and "
                                              "sample quality.")
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for benchmark in BENCHMARKS:
        parser = commands.add_parser(benchmark.name, help=benchmark.help,
                                     description=benchmark.description)
        benchmark.add_arguments(parser)
        parser.set_defaults(func=benchmark.run)


def add_consistency_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mag bench consistency``."""
    parser.add_argument("--policies", default="full,window,downsample",
                        help="comma-separated cache policies (full, window, downsample; mag, "
                             "bounded, official and archive with --memory-model)")
    parser.add_argument("--split", default="test", help="world split (train, val, test)")
    parser.add_argument("--episodes", type=int, default=None, help="number of episodes (default: "
                                                                   "all 176)")
    parser.add_argument("--seed-base", type=int, default=None,
                        help="episode seeds start here instead of the split's range")
    parser.add_argument("--excursion-scale", type=float, default=1.0,
                        help="multiply the world's excursion lengths (longer = more beyond-window "
                             "revisits)")
    parser.add_argument("--episode-frames", type=int, default=None,
                        help="episode length in frames (default: the world's, made long enough "
                             "for the return"
                             " leg); keep it within the model's training clip length to stay in "
                             "distribution")
    parser.add_argument("--frames-after", type=int, default=None,
                        help="frames to generate after the switch (whole blocks; default: to the "
                             "episode"
                             " end)")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="predict each block from the TRUE earlier frames (recall apart from "
                             "drift)")
    add_model_flags(parser, model=None, memory_model=None,
                    model_when_none="an untrained model of --preset, a floor",
                    memory_when_none="none")
    parser.add_argument("--preset", default=None, help="preset of the untrained model (default "
                                                       "tiny); with"
                                                       " --model it must match the checkpoint's")
    parser.add_argument("--world", default=None,
                        help="named world config (default: the checkpoint's training world, else "
                             "'default')")
    parser.add_argument("--videos", default=None,
                        help="folder of mp4 files (+ switch_times.json for the frame-aligned "
                             "protocol): run"
                             " the protocol on real videos")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=FRAME_ALIGNED,
                        help="frame-aligned (default): each generated frame scored against the "
                             "ground truth"
                             " at its own time and the history frame of the same view; magbench: "
                             "MAG-Bench's"
                             " own, with --videos: switch at 75%% of each clip, history "
                             "VAE-encoded, each"
                             " generated frame scored against its LPIPS-nearest ground-truth "
                             "frame of the"
                             " return segment (prompts from the folder's prompts.json, else none)")
    parser.add_argument("--sampler", choices=("few_step", "euler"), default="few_step")
    parser.add_argument("--steps", type=int, default=0, help="Euler steps (--sampler euler)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free "
                                                                          "guidance (1 ="
                        " off)")
    parser.add_argument("--batch-size", type=int, default=32, help="episodes streamed together at "
                                                                   "most")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (the same noise for every "
                                                            "policy)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (the slowest metric "
                                                                "on CPU)")
    parser.add_argument("--empty-prompt-after-switch", action="store_true",
                        help="generate with the empty prompt after the switch (history fed with "
                             "the real"
                             " one):"
                             " what comes back can only come from memory")
    add_memory_cache_arguments(parser)
    add_real_weights_arguments(parser)
    for side in ("height", "width"):
        parser.add_argument(f"--{side}", type=int, default=None,
                            help=f"frame {side} with --wan-dir / --weights (default the preset's);"
                                 " the videos are resized to it")
    add_runtime_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_out_argument(parser, "output folder (summary.json, summary.md, plots, episodes/)")


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, preset, model metadata)`` from --model, or an untrained model of --preset."""
    import torch

    if args.model is None:
        preset = get_preset(args.preset or "tiny")
        torch.manual_seed(RANDOM_MODEL_SEED)
        model = WanDiT(preset.dit).to(args.device).eval()
        return model, preset, {"model": None, "note": f"untrained model (seed {RANDOM_MODEL_SEED})"}
    model, preset, metadata = load_generator(args.model, device=args.device)
    if args.preset is not None and args.preset != preset.name:
        raise ConfigError(f"--preset {args.preset} does not match the checkpoint's preset "
                          f"{preset.name!r};"
                          " drop --preset (the checkpoint defines the model)")
    return model, preset, metadata


def _check_magbench_flags(args: argparse.Namespace) -> None:
    """The magbench protocol takes real videos and fixes what the frame-aligned options choose."""
    if args.videos is None:
        raise ConfigError("--protocol magbench runs on real videos; give --videos DIR (a folder "
                          "of mp4"
                          " files)")
    given = {"--teacher-forced": args.teacher_forced, "--no-lpips": args.no_lpips,
             "--frames-after": args.frames_after is not None,
             "--empty-prompt-after-switch": args.empty_prompt_after_switch}
    fixed = [flag for flag, on in given.items() if on]
    if fixed:
        raise ConfigError("--protocol magbench fixes the switch, the generated length and the LPIPS"
                          f" matching; drop {', '.join(fixed)}")


def _consistency(args: argparse.Namespace) -> int:

    started = time.time()
    set_threads(args.threads)
    check_output_dir(args.out)  # before any model or episode
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies:
        raise ConfigError("--policies is empty; give e.g. full,window,downsample")
    if args.protocol == MAGBENCH:
        _check_magbench_flags(args)
    config = ConsistencyConfig(
        policies=policies, teacher_forced=args.teacher_forced,
        sampler=SamplerConfig(args.sampler, args.steps, args.guidance_scale).validate(),
        batch_size=args.batch_size, seed=args.seed, lpips=not args.no_lpips,
        empty_prompt_after_switch=args.empty_prompt_after_switch)
    size = {f"video.{k}": getattr(args, k) for k in ("height", "width")
            if getattr(args, k) is not None}
    if size and not uses_real_weights(args):
        raise ConfigError("--height and --width go with --wan-dir / --weights (downloaded weights);"
                          " the tiny presets fix their frame size")
    pipe = pipeline_from_args(args, policy=policies[0], **size) if uses_real_weights(args) else None
    if pipe is not None:
        model, preset, model_meta = pipe.generator.model, pipe.preset, pipe.generator.meta
    else:
        model, preset, model_meta = _load(args)
        model = model.to(dtype_from_args(args))
    overrides = cache_overrides(args)
    if overrides:
        cache = dataclasses.replace(preset.cache, **overrides)
        preset = dataclasses.replace(preset, cache=cache).validate()
    memory_model = empty_context = None
    memory_meta: dict[str, Any] | None = None
    if pipe is not None and pipe.memory is not None:
        memory_model, memory_meta, empty_context = pipe.memory, {}, pipe.encode([""])
    elif args.memory_model is not None:
        memory_model, memory_meta, empty_context = load_memory_for(args.memory_model, preset,
                                                                   args.device,
                                                                   dtype_from_args(args))
    build_policies(policies, preset, memory_model=memory_model,  # fail before any episode is built
                   empty_context=empty_context)
    data = recipe_data(model_meta)
    encode = pipe.encode if pipe is not None else text_cache(preset, model_meta).get
    codec = None if pipe is None else pipe.codec
    if args.protocol == MAGBENCH:
        return _magbench(args, config, model, preset, encode, codec, memory_model, empty_context, {
            "command": shlex.join(["mag", *sys.argv[1:]]), "commit": git_commit(),
            "machine": machine_info(args.device), "preset": preset.to_dict(),
            "model": model_record(args.weights or args.model, model_meta),
            "memory_model": None if memory_meta is None else model_record(
                args.memory_weights or args.memory_model, memory_meta),
            "videos": str(Path(args.videos).resolve()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))}, started)

    world_info: dict[str, Any]
    if args.videos is not None:
        episodes = video_episodes(args.videos, preset, frames_after=args.frames_after)
        world_info = {"videos": str(Path(args.videos).resolve())}
    else:
        world, source = bench_world(preset, name=args.world,
                                    training_world=data.get("world") or None,
                                    excursion_scale=args.excursion_scale,
                                    frames_after=args.frames_after,
                                    episode_frames=args.episode_frames)
        count = args.episodes if args.episodes is not None else NUM_TEST_EPISODES
        episodes = world_episodes(world, split=args.split, count=count, seed_base=args.seed_base,
                                  frames_after=args.frames_after,
                                  teacher_forced=args.teacher_forced)
        world_info = {"source": source, "split": args.split, "seed_base": args.seed_base,
                      "excursion_scale": args.excursion_scale, "config": dataclasses.asdict(world)}
    result = run_consistency(model, preset, episodes, encode, config, progress=not args.no_progress,
                             memory_model=memory_model, empty_context=empty_context, codec=codec)
    metadata = {
        "command": shlex.join(["mag", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(args.device),
        "preset": preset.to_dict(),
        "model": model_record(args.weights or args.model, model_meta),
        "memory_model": None if memory_meta is None else model_record(
            args.memory_weights or args.memory_model, memory_meta),
        "world": world_info,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    summary = write_results(args.out, result, config, preset, metadata)
    for name, row in {**summary["policies"], **summary["references"]}.items():
        gt, hist = row["vs_gt"], row["vs_history"]
        print(f"{name:>12}: vs GT PSNR {_db(gt['psnr'])} (beyond {_db(gt['beyond']['psnr'])}),"
              f" vs history PSNR {_db(hist['psnr'])} (beyond {_db(hist['beyond']['psnr'])});"
              f" beyond-window revisits vs GT: gap 1-24 {_db(row['revisits']['gap_1_24']['psnr'])},"
              f" gap 97-500 {_db(row['revisits']['gap_97_500']['psnr'])}")
    print(f"wrote {Path(args.out) / 'summary.json'} ({config.mode}, {len(episodes)} episodes,"
          f" {metadata['seconds']} s)")
    return 0


def _magbench(args: argparse.Namespace, config: ConsistencyConfig, model: WanDiT, preset: Any,
              encode: Callable[[list[str]], Any], codec: Any, memory_model: WanDiT | None,
              empty_context: Any, metadata: dict[str, Any], started: float) -> int:
    """``--protocol magbench``: run every policy on the clips, write summary.json / summary.md."""
    codec = codec if codec is not None else get_codec_for(preset.video)
    clips = magbench_clips(args.videos, preset, codec.temporal_compression)
    rows = run_magbench(model, preset, clips, encode, config, memory_model=memory_model,
                        empty_context=empty_context, codec=codec)
    summary = write_magbench_results(args.out, clips, rows, config,
                                     {**metadata, "seconds": round(time.time() - started, 1)})
    for name, row in summary["policies"].items():
        print(f"{name:>12}: LPIPS {row['lpips']:.4f}, PSNR {row['psnr']:.2f} dB, SSIM "
              f"{row['ssim']:.4f}"
              " (nearest ground-truth frame of the return segment)")
    print(f"wrote {Path(args.out) / 'summary.json'} (magbench, {len(clips)} clips,"
          f" {summary['metadata']['seconds']} s)")
    return 0


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mag bench memory``."""
    add_model_flags(parser, model=None, memory_model=None, with_model=False, memory_required=True)
    parser.add_argument("--baseline-model", default=None,
                        help="a generator run through the same pass untrained as a memory model "
                             "(e.g. the"
                             " model the memory model was initialised from): what stage-1 "
                             "training buys")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="held-out world "
                                                                                "split")
    parser.add_argument("--episodes", type=int, default=16, help="number of clips")
    parser.add_argument("--seed-base", type=int, default=None,
                        help="episode seeds start here instead of the split's range")
    parser.add_argument("--world", default=None,
                        help="named world config (default: the memory model's training world, else"
                             " 'default')")
    parser.add_argument("--clip-frames", type=int, default=None,
                        help="frames per clip (default: the memory model's training clip length, "
                             "else the"
                             " shortest episode), whole blocks")
    parser.add_argument("--batch-size", type=int, default=8, help="clips run together at most")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (the same noise for every "
                                                            "model)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (the slowest metric "
                                                                "on CPU)")
    add_runtime_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_out_argument(parser, "output folder (summary.json, summary.md, strip.png)")


def _memory(args: argparse.Namespace) -> int:

    started = time.time()
    set_threads(args.threads)
    check_output_dir(args.out)  # before any model or episode
    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {args.episodes}")
    dtype = dtype_from_args(args)
    memory, preset, memory_meta = load_memory_model(args.memory_model, device=args.device)
    models = {"memory": memory.to(dtype)}
    contexts = {"memory": empty_context(preset, memory_meta).to(dtype)}
    records = {"memory": model_record(args.memory_model, memory_meta)}
    if args.baseline_model is not None:
        baseline, baseline_preset, baseline_meta = load_model(args.baseline_model,
                                                              device=args.device,
                                                              expect_stage=GENERATOR_STAGES)
        check_memory_model(baseline_preset, preset)
        models["baseline"] = baseline.to(dtype)
        contexts["baseline"] = empty_context(baseline_preset, baseline_meta).to(dtype)
        records["baseline"] = model_record(args.baseline_model, baseline_meta)
    data = recipe_data(memory_meta)
    world, source = bench_world(preset, name=args.world, training_world=data.get("world") or None)
    episodes = world_episodes(world, split=args.split, count=args.episodes,
                              seed_base=args.seed_base)
    requested = args.clip_frames if args.clip_frames is not None else data.get("clip_frames")
    if args.clip_frames is None and isinstance(requested, int):
        requested = min(requested, min(ep.frames.shape[0] for ep in episodes))
    frames = clip_length(episodes, preset.cache.frames_per_block, preset.dit.rope_max_positions,
                         requested if isinstance(requested, int) else None)
    config = ReconConfig(seed=args.seed, batch_size=args.batch_size, lpips=not args.no_lpips)
    result = run_memory_recon(models, preset, episodes, contexts, frames, config,
                              progress=not args.no_progress)
    metadata = {
        "command": shlex.join(["mag", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(args.device),
        "preset": preset.to_dict(),
        "models": records,
        "world": {"source": source, "split": args.split, "seed_base": args.seed_base,
                  "config": dataclasses.asdict(world)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    summary = write_recon_results(args.out, result, config, metadata)
    for name, rows in {**summary["models"], **summary["references"]}.items():
        label, row = (FEW_STEP, rows[FEW_STEP]) if FEW_STEP in rows else next(iter(rows.items()))
        rest = row["non_retained"]
        print(f"{name:>13} {label}: PSNR {_db(row['psnr'])} (non-retained {_db(rest['psnr'])}),"
              f" SSIM {row['ssim']:.3f}")
    print(f"wrote {Path(args.out) / 'summary.json'} ({len(episodes)} {args.split} clips of "
          f"{frames} frames,"
          f" {metadata['seconds']} s)")
    return 0


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} dB"


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("consistency", "MAG-Bench-style revisit consistency per cache policy",
              "Feed each episode's history into the KV cache under each policy, generate the "
              "rest, and score"
              " the frames vs ground truth and vs the history frame of the same view, within and "
              "beyond the"
              " window policy's attention.", add_consistency_arguments, _consistency),
    Benchmark("memory", "memory reconstruction: PSNR/SSIM of blocks sampled from compressed memory",
              MEMORY_DESCRIPTION, add_memory_arguments, _memory),
    Benchmark("speed", "frames/s, per-block latency, peak RSS or GPU bytes, KV bytes, per cache "
                       "policy",
              "Stream --frames video frames under each cache policy (random weights unless "
              "--model) and"
              " report"
              " fps, p50/p95 block latency, peak RSS or device bytes and KV bytes up to 10,000 "
              "frames.",
              add_speed_arguments, run_speed_cli),
    Benchmark("quality", "sample quality: Fréchet AlexNet distance of samples vs held-out real "
                         "clips",
              "Sample one clip per held-out world clip (its prompt and camera track) with each "
              "model and"
              " report"
              " the Fréchet distance of AlexNet features to the real frames, PSNR / SSIM vs the "
              "real clips"
              " for"
              " reference, and a real-vs-real floor.", add_quality_arguments, run_quality_cli),
)
