"""Downloaded upstream weights in the commands: the flags every command shares and ``mag
generate``'s run.

``--wan-dir`` is the original Wan2.1-T2V-1.3B folder (UMT5 text encoder and VAE), ``--weights`` /
``--memory-weights`` the generator and memory model in any format :func:`mag.weights.detect_source`
knows. Every path is checked for its format before anything heavy loads, so a wrong file fails in
one line. docs/real-weights.md walks through download -> one command -> memory -> MAG-Bench.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from mag.app import LoadedModels
from mag.codecs import Codec
from mag.errors import ConfigError
from mag.io.cli import add_dtype_argument, dtype_from_args
from mag.io.paths import check_output_file
from mag.io.video import write_mp4
from mag.pipelines import MagPipeline, SamplerConfig
from mag.pipelines.pretrained import latent_frames_for_seconds
from mag.registry import shipped_models
from mag.weights import detect_source

__all__ = ["add_real_weights_arguments", "loaded_from_pipeline", "pipeline_from_args",
           "run_generate", "uses_real_weights"]

GIB = 2 ** 30
FORMATS = ("an official MAG folder (config.json + diffusion_pytorch_model.safetensors), a "
           "Self-Forcing .pt,"
           " a diffusers or Wan2.1 folder, or a mag model file")


def add_real_weights_arguments(parser: argparse.ArgumentParser, *, memory: bool = True) -> None:
    """``--wan-dir``, ``--weights``, ``--memory-weights`` (and ``--dtype`` unless the parser has
    one)."""
    group = parser.add_argument_group("downloaded weights (docs/real-weights.md)")
    group.add_argument("--wan-dir", default=None,
                       help="the Wan2.1-T2V-1.3B folder: its Wan2.1_VAE.pth (VAE),"
                            " models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/ (text encoder),"
                            " config.json (model shapes)")
    group.add_argument("--weights", default=None, help=f"generator weights: {FORMATS}")
    if memory:
        group.add_argument("--memory-weights", default=None,
                           help="MAG memory model weights (mag, bounded, official and archive "
                                     "policies): "
                                f"{FORMATS}")
    if not any("--dtype" in action.option_strings for action in parser._actions):
        add_dtype_argument(group)


def uses_real_weights(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "wan_dir", None) or getattr(args, "weights", None))


def _check_files(args: argparse.Namespace) -> None:
    """Detect every given path's format (cheap: names and headers only); a wrong one fails here."""
    if args.weights is None:
        raise ConfigError("--wan-dir needs --weights: the generator (an official MAG generator "
                          "folder, a"
                          " Self-Forcing .pt, ...; docs/real-weights.md)")
    if args.wan_dir is not None and detect_source(args.wan_dir).kind != "wan2.1":
        raise ConfigError(f"--wan-dir {args.wan_dir} is not the original Wan2.1 folder (expected"
                          " Wan2.1_VAE.pth and models_t5_umt5-xxl-enc-bf16.pth beside config.json)")
    for path in (args.weights, getattr(args, "memory_weights", None)):
        if path is not None and str(path) not in shipped_models():
            detect_source(path)


def pipeline_from_args(args: argparse.Namespace, *, policy: str | None = None,
                       **preset_overrides: object) -> MagPipeline:
    """The :class:`MagPipeline` the flags describe (device, dtype, policy, weights, video size)."""
    _check_files(args)
    return MagPipeline.from_pretrained(
        args.weights, wan_dir=args.wan_dir, memory_weights=getattr(args, "memory_weights", None),
        policy=policy or getattr(args, "policy", None), device=args.device,
        dtype=dtype_from_args(args), sampler=SamplerConfig(), **preset_overrides)


def loaded_from_pipeline(pipe: MagPipeline) -> tuple[LoadedModels, Codec]:
    """What the tiny-model commands load (:class:`LoadedModels`), and the codec, from a pipeline."""
    empty = pipe.encode([""]) if pipe.memory is not None else None
    loaded = LoadedModels(pipe.generator.model, pipe.preset, pipe.generator.meta, pipe.text,
                          memory=pipe.memory, memory_meta=None, empty_context=empty)
    return loaded, pipe.codec


def run_generate(args: argparse.Namespace) -> int:
    """``mag generate`` with downloaded weights: stream, write every decoded frame, report memory
    and FPS."""
    unsupported = [flag for flag, value in (("--actions", args.actions), ("--velocity",
                                                                          args.velocity),
                                            ("--prompts", args.prompts)) if value is not None]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} steer the tiny world's camera / prompt "
                          "schedule;"
                          " with --wan-dir give --prompt and --seconds")
    if args.prompt is None:
        raise ConfigError("--prompt is needed with --wan-dir / --weights")
    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError(f"--seconds must be > 0, got {args.seconds}")
    _check_files(args)
    output = check_output_file(args.out)
    overrides = {
        f"video.{k}": getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None
    }
    pipe = pipeline_from_args(args, **overrides)
    preset = pipe.preset
    seconds = args.seconds if args.seconds is not None else args.frames / preset.video.fps
    latent = latent_frames_for_seconds(preset, seconds)
    plan = pipe.memory_plan(latent)
    kv = plan.pop("kv_cache")
    parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in plan.items())
    dtype = str(dtype_from_args(args)).removeprefix("torch.")
    print(f"memory ({dtype}): weights {sum(plan.values()) / GIB:.2f} GiB ({parts}), KV cache"
          f" {kv / GIB:.2f} GiB ({pipe.policy_name}); activations come on top", flush=True)
    prompt = args.prompt
    total = pipe.codec.video_frames(latent)
    started = time.perf_counter()
    stream = pipe.stream(prompt, latent_frames=latent, seed=args.seed)
    frames = np.stack(list(tqdm(stream, total=total, unit="frame", desc="generate "
                                                                        f"({pipe.policy_name})",
                                disable=args.no_progress)))
    elapsed = time.perf_counter() - started
    write_mp4(output, frames, preset.video.fps)
    peak = torch.cuda.max_memory_allocated() / GIB if pipe.device.type == "cuda" else None
    print(f"wrote {output}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]} at "
          f"{preset.video.fps}"
          f" fps, policy {pipe.policy_name}, {len(frames) / elapsed:.1f} FPS incl. decode"
          + (f", peak GPU memory {peak:.2f} GiB" if peak is not None else ""))
    return 0

