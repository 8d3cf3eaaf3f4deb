"""``mag generate``: stream a video from a prompt under a cache policy, with the camera steered per
frame and prompts switched at given frames (LongLive-style KV re-cache); reports FPS and KV bytes.

The camera track is the conditioning of camera-anchored models: frame ``i`` is generated at
``track[i] = sum(velocity[1..i])`` px (:func:`mag.world.camera_track`). Velocities are finite and at
most one frame width; a prompt switch takes effect at the first block boundary at or after its
frame. The ``--actions`` and ``--prompts`` file formats and the measured camera response:
docs/generate.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mag.app import (
    LoadedModels,
    add_compile_argument,
    add_model_arguments,
    check_velocity,
    config_from_args,
    load_models,
    sampler_config,
    set_threads,
    synchronize,
)
from mag.codecs import get_codec_for, tensor_to_frames
from mag.errors import ConfigError, InputError
from mag.io.cli import add_out_argument, dtype_from_args
from mag.io.paths import check_output_file
from mag.io.text import check_text
from mag.io.video import MP4_SUFFIXES, write_mp4
from mag.pipelines import (
    MEMORY_MODEL_POLICIES,
    SamplerConfig,
    StreamingGenerator,
    check_policy_name,
    compile_stream,
    policy_from_name,
    writer_for,
)
from mag.real_weights import add_real_weights_arguments, run_generate, uses_real_weights
from mag.world import camera_track

__all__ = ["GenerateResult", "PromptSwitch", "frame_shifts", "parse_actions", "parse_prompts",
           "stream"]

# Camera speed of the tiny world (px/frame): what the shipped models were trained on.
DEFAULT_VELOCITY_PX = 4.0
DEFAULT_FRAMES = 48
DEFAULT_POLICY = "mag"
# A prompt of the world's test split (in distribution for the tiny models' text conditioning).
DEFAULT_PROMPT = ("a camera panning slowly across a calm, sunlit underwater coral reef with fish "
                  "and sea"
                  " plants")


@dataclass(frozen=True)
class PromptSwitch:
    """Prompt ``prompt`` from frame ``frame`` on (applied at the block boundary ``block_frame``)."""

    frame: int
    prompt: str
    block_frame: int


@dataclass
class GenerateResult:
    """A generated stream: uint8 ``[N, H, W, 3]`` frames, timing and cache size."""

    frames: np.ndarray
    seconds: float
    kv_bytes: int
    kv_capacity_bytes: int
    switches: list[PromptSwitch]

    @property
    def fps(self) -> float:
        return self.frames.shape[0] / self.seconds if self.seconds > 0 else math.inf


# ---------------------------------------------------------------------------------------------
# Input files


def _read_json(path: str | Path, what: str) -> Any:
    source = Path(path)
    if not source.is_file():
        raise InputError(f"{what} file {source} does not exist")
    try:
        return json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(
            f"{what} file {source} is not valid JSON ({err}); see docs/generate.md"
        ) from err


def parse_actions(path: str | Path, frames: int, max_px: float) -> np.ndarray:
    """Per-frame camera velocities float32 ``[frames]`` (px/frame) from an actions file (module
    docstring)."""
    data = _read_json(path, "actions")
    if isinstance(data, list):
        if len(data) != frames:
            raise InputError(f"actions file {path} lists {len(data)} velocities for --frames "
                             f"{frames};"
                             " give one per frame, or keyframes as an object {\"frame\": velocity}")
        return np.asarray([check_velocity(v, f"{path} entry {i}", max_px) for i,
                           v in enumerate(data)],
                          dtype=np.float32)
    if isinstance(data, dict) and data:
        keys = {}
        for key, value in data.items():
            if not key.isdigit() or int(key) >= frames:
                raise InputError(f"actions file {path}: keyframe {key!r} must be a frame index in"
                                 f" [0, {frames})")
            keys[int(key)] = check_velocity(value, f"{path} keyframe {key}", max_px)
        out = np.zeros(frames, dtype=np.float32)
        for frame in sorted(keys):
            out[frame:] = keys[frame]
        return out
    raise InputError(f"actions file {path} must hold a JSON list of per-frame velocities or a "
                     "non-empty"
                     f" object of keyframes {{\"frame\": velocity}}, got {type(data).__name__}")


def parse_prompts(path: str | Path | None, prompt: str | None, frames: int,
                  frames_per_block: int) -> list[PromptSwitch]:
    """Prompt schedule from ``--prompts FILE`` and ``--prompt`` (module docstring), the first at
    frame 0."""
    entries: list[tuple[int, str]] = []
    if path is not None:
        data = _read_json(path, "prompts")
        if not isinstance(data, list) or not data:
            raise InputError(f"prompts file {path} must hold a non-empty JSON list of"
                             f" {{\"frame\": int, \"prompt\": str}} objects, got "
                             f"{type(data).__name__}")
        for i, entry in enumerate(data):
            ok = (isinstance(entry, dict) and isinstance(entry.get("frame"), int)
                  and not isinstance(entry.get("frame"), bool) and isinstance(entry.get("prompt"),
                                                                              str)
                  and entry["prompt"].strip())
            if not ok:
                raise InputError(f"prompts file {path} entry {i} must be "
                                 f"{{\"frame\": int, \"prompt\":"
                                 f" non-empty str}}, got {entry!r:.80}")
            if not 0 <= entry["frame"] < frames:
                raise InputError(f"prompts file {path} entry {i}: frame {entry['frame']} is "
                                 "outside the"
                                 f" {frames} generated frames")
            entries.append((entry["frame"], check_text(entry["prompt"], f"prompts file {path} "
                                                                        f"entry {i}")))
        frames_given = [f for f, _ in entries]
        if frames_given != sorted(set(frames_given)):
            raise InputError(f"prompts file {path}: frames must increase strictly, got "
                             f"{frames_given}")
    if not entries or entries[0][0] != 0:
        if prompt is None:
            raise InputError("no prompt for frame 0: give --prompt, or a prompts-file entry with"
                             " \"frame\": 0")
        entries.insert(0, (0, check_text(prompt, "--prompt")))
    elif prompt is not None and path is not None:
        raise InputError(f"--prompt and the frame-0 entry of {path} both give the first prompt; "
                         "drop one")
    switches = []
    for frame, text in entries:
        block_frame = frames_per_block * math.ceil(frame / frames_per_block)
        if switches and block_frame == switches[-1].block_frame:
            raise InputError(f"prompts at frames {switches[-1].frame} and {frame} fall on the "
                             "same block"
                             f" boundary ({block_frame}; blocks of {frames_per_block} frames); "
                             "space them"
                             " apart")
        switches.append(PromptSwitch(frame, text, block_frame))
    return switches


# ---------------------------------------------------------------------------------------------
# Streaming


def stream(loaded: LoadedModels, policy_name: str, sampler: SamplerConfig, velocities: np.ndarray,
           switches: list[PromptSwitch], *, seed: int = 0, progress: bool = True,
           compile_model: bool = False) -> GenerateResult:
    """Generate ``len(velocities)`` frames under ``policy_name`` (whole blocks, trimmed at the end).

    Args:
        loaded: :class:`mag.app.LoadedModels` (generator, text encoder, optional memory model).
        velocities: float32 ``[N]`` camera velocity per frame (px/frame). switches: the prompt
        schedule, first at frame 0 (:func:`parse_prompts`). compile_model: ``torch.compile`` the
        generator and memory model (:mod:`mag.models.compile`); one
            untimed warm-up block compiles them before the stream (a failure falls back to eager).
    """
    import torch
    from tqdm.auto import tqdm

    preset, model = loaded.preset, loaded.model
    check_policy_name(policy_name, has_memory_model=loaded.memory is not None)
    policy = policy_from_name(policy_name, preset)
    writer = writer_for(policy, memory_model=loaded.memory, empty_context=loaded.empty_context)
    block = preset.cache.frames_per_block
    count = int(velocities.shape[0])
    padded = block * math.ceil(count / block)
    moves = np.concatenate([velocities, np.repeat(velocities[-1:], padded - count)])
    gen = StreamingGenerator.for_preset(model, preset, policy, sampler=sampler, writer=writer)
    device = gen.device
    offsets = None
    if preset.dit.camera_rope:
        track = torch.from_numpy(camera_track(moves))[None] / preset.dit.patch_size[2]
        offsets = track.to(device)
    contexts = {s.block_frame: loaded.encode([s.prompt]) for s in switches}  # encode before timing
    codec = get_codec_for(preset.video)
    compiled = []
    if compile_model:
        compiled, failure = compile_stream(gen, contexts[0],
                                           width_offsets=None if offsets is None else
                                           offsets[:, :block])
        if failure is not None:
            print(f"mag: torch.compile failed ({failure}); generating without compile",
                  file=sys.stderr, flush=True)
    noise = torch.Generator(device=device).manual_seed(seed)
    decoded = []
    try:
        gen.reset(1, padded)
        synchronize(device)
        started = time.perf_counter()
        for start in tqdm(range(0, padded, block), desc=f"generate ({policy_name})", unit="block",
                          disable=not progress):
            if start in contexts:
                (gen.set_prompt if start == 0 else gen.recache)(contexts[start])
            latents = gen.generate_block(
                noise, None if offsets is None else offsets[:, start : start + block]
            )
            decoded.append(codec.decode(latents))
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        for c in compiled:  # the caller's models come back eager
            c.restore()
    frames = tensor_to_frames(torch.cat(decoded, 1)[0])[:count]
    kv = sum(c.nbytes for c in (gen.cache, gen.uncond_cache) if c is not None)
    capacity = sum(c.capacity_bytes for c in (gen.cache, gen.uncond_cache) if c is not None)
    return GenerateResult(frames, seconds, kv, capacity, switches)


def frame_shifts(frames: np.ndarray, max_shift: int) -> np.ndarray:
    """Horizontal content shift (px) between consecutive frames: int ``[T-1]``.

    For each pair, the shift ``d`` in ``[-max_shift, max_shift]`` minimising the mean squared
    difference between ``cur[:, x]`` and ``prev[:, x + d]`` over their overlap: a camera moving
    right by ``d`` px moves the content left by ``d``, so ``d`` is the camera's velocity as seen in
    the frames.
    """
    video = np.asarray(frames, dtype=np.float64)
    width = video.shape[2]
    if not 0 < max_shift < width:
        raise InputError(f"max_shift must be in (0, {width}), got {max_shift}")
    out = []
    for prev, cur in zip(video[:-1], video[1:], strict=True):
        errors = {}
        for d in range(-max_shift, max_shift + 1):
            a = cur[:, max(0, -d):width - max(0, d)]
            b = prev[:, max(0, d):width - max(0, -d)]
            errors[d] = float(np.mean((a - b) ** 2))
        out.append(min(errors, key=lambda d: (errors[d], abs(d))))
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:

    p = subparsers.add_parser(
        "generate", help="stream a video from a prompt with a steered camera (mp4, FPS, KV memory)",
        description="Generate --frames frames block by block under a cache policy, the camera "
                    "moving at"
                    " --velocity px/frame or as --actions FILE says, prompts switching as "
                    "--prompts FILE"
                    " says (KV re-cache at each switch); writes an mp4 and prints FPS and KV bytes."
                    " File formats: docs/generate.md.")
    p.add_argument("--prompt", default=None, help="prompt from frame 0 (default: a test-split "
                                                  "world prompt"
                                                  " unless --prompts gives frame 0)")
    p.add_argument("--prompts", default=None, help='JSON list [{"frame": 0, "prompt": "..."}, ...]')
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames (default "
                                                                      f"{DEFAULT_FRAMES})")
    p.add_argument("--seconds", type=float, default=None,
                   help="video length in seconds at the preset's fps (instead of --frames; 30 s "
                        "at Wan scale"
                        " = 120 latent frames = 477 video frames)")
    p.add_argument("--height", type=int, default=None, help="frame height (default: the preset's, "
                                                            "480)")
    p.add_argument("--width", type=int, default=None, help="frame width (default: the preset's, "
                                                           "832)")
    p.add_argument("--policy", default=None,
                   help="cache policy: full, window, downsample, mag, bounded, official, archive "
                        f"(default: the preset's: {DEFAULT_POLICY} for tiny, official for "
                        "wan-1.3b)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--velocity", type=float, default=None,
                   help=f"constant camera velocity, px/frame (default {DEFAULT_VELOCITY_PX:g})")
    p.add_argument("--actions", default=None,
                   help="JSON per-frame velocities [v0, v1, ...] or keyframes {\"frame\": v} "
                        "(px/frame)")
    add_out_argument(p, "output mp4")
    add_compile_argument(p)
    add_model_arguments(p)
    add_real_weights_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if uses_real_weights(args):
        return run_generate(args)
    if args.seconds is not None or args.height is not None or args.width is not None:
        raise ConfigError("--seconds, --height and --width go with --wan-dir / --weights (real "
                          "weights); the"
                          " shipped tiny models take --frames at their own size")
    args.policy = args.policy or DEFAULT_POLICY
    # before any model loads
    check_policy_name(args.policy, has_memory_model=bool(args.memory_model))
    if args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    if args.actions is not None and args.velocity is not None:
        raise ConfigError("give --velocity or --actions, not both")
    config = config_from_args(args)
    sampler = sampler_config(config)
    output = check_output_file(args.out, suffixes=MP4_SUFFIXES)
    needs_memory = args.policy in MEMORY_MODEL_POLICIES and bool(config.memory_model)
    loaded = load_models(config, device=args.device, with_memory=needs_memory,
                         dtype=dtype_from_args(args))
    preset = loaded.preset
    horizon = preset.dit.rope_max_positions
    if args.frames > horizon:  # before any per-frame array is allocated
        raise ConfigError(f"--frames {args.frames} is more than this model streams: its RoPE "
                          "table holds"
                          f" {horizon} frames (dit.rope_max_positions)")
    width = float(preset.video.width)
    if args.actions is not None:
        velocities = parse_actions(args.actions, args.frames, width)
    else:
        speed = DEFAULT_VELOCITY_PX if args.velocity is None else args.velocity
        velocities = np.full(args.frames, check_velocity(speed, "--velocity", width),
                             dtype=np.float32)
    prompt = args.prompt if args.prompt is not None or args.prompts is not None else DEFAULT_PROMPT
    switches = parse_prompts(args.prompts, prompt, args.frames, preset.cache.frames_per_block)
    result = stream(loaded, args.policy, sampler, velocities, switches, seed=args.seed,
                    progress=not args.no_progress, compile_model=args.compile)
    write_mp4(output, result.frames, preset.video.fps)  # small frames are upscaled to a 128 px side
    for switch in result.switches[1:]:
        print(f"prompt switch at frame {switch.block_frame} (asked {switch.frame}): "
              f"{switch.prompt!r}")
    print(f"wrote {output}: {args.frames} frames, policy {args.policy}, {result.fps:.1f} FPS"
          f" ({result.seconds:.2f} s streaming), KV cache {result.kv_bytes:,} bytes"
          f" (allocated {result.kv_capacity_bytes:,})")
    return 0
