"""``mag bench speed`` on the command line: its options, cheap validation first, then the run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from mag.app import add_memory_cache_arguments, add_model_flags, cache_overrides, machine_info
from mag.bench.speed.measure import run_speed
from mag.bench.speed.report import peak_bytes
from mag.bench.speed.setup import (
    ATTENTION_BACKENDS,
    CUDA_ONLY_ATTENTION,
    DEVICES,
    SpeedConfig,
    build_models,
)
from mag.checkpoint import git_commit
from mag.errors import ConfigError, InputError
from mag.io.cli import add_out_argument, add_runtime_arguments, dtype_from_args, set_threads
from mag.io.files import FIGURE_SUFFIXES, check_output
from mag.models.compile import COMPILE_MODES
from mag.pipelines import (
    AVAILABLE_POLICIES,
)
from mag.real_weights import add_real_weights_arguments


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mag bench speed``."""
    parser.add_argument("--preset", default=None,
                        help="tiny or wan-1.3b (default tiny; with --model: its preset)")
    parser.add_argument("--policies", default="full,window,mag",
                        help=f"comma-separated cache policies ({', '.join(AVAILABLE_POLICIES)})")
    parser.add_argument("--frames", type=int, default=48,
                        help="video frames of the measured stream (rounded up to whole blocks)")
    parser.add_argument("--warmup-blocks", type=int, default=1, help="unmeasured blocks before "
                                                                     "each stream")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measured streams per policy, interleaved across policies; fps is "
                             "their median")
    parser.add_argument("--attention", default="auto", choices=tuple(ATTENTION_BACKENDS),
                        help="pin the SDPA backend (default auto: PyTorch chooses; cudnn and "
                             "efficient are"
                             " CUDA only)")
    parser.add_argument("--profile-blocks", type=int, default=0,
                        help="profile one more stream of this many blocks per policy "
                             "(torch.profiler; top"
                             " operators in the JSON's 'profile')")
    add_model_flags(parser, model=None, memory_model=None, model_when_none="random weights",
                    memory_when_none="random weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights (the default when no --model is given)")
    add_runtime_arguments(parser, devices=DEVICES)
    parser.add_argument("--steps", type=int, default=None, help="few-step count (default: the "
                                                                "preset's)")
    parser.add_argument("--height", type=int, default=None, help="video height override (pixels)")
    parser.add_argument("--rope-max-positions", type=int, default=None,
                        help="position-table length of a random-weight model, for streams longer "
                             "than the"
                             " preset's (e.g. 10,000 frames of the tiny preset)")
    parser.add_argument("--width", type=int, default=None, help="video width override (pixels)")
    add_memory_cache_arguments(parser)
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile each block except its cached attention, in "
                             "torch.compile mode"
                             f" MODE ({', '.join(COMPILE_MODES)}; default 'default'; "
                             "reduce-overhead adds"
                             " CUDA graphs); falls back to eager on failure")
    parser.add_argument("--no-decode", action="store_true", help="do not decode latents (codec "
                                                                 "not timed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    add_out_argument(parser, "output .json file (the PNG plot is written next to it)")
    add_real_weights_arguments(parser)


def _json_path(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".json":
        raise InputError(f"--out must name a .json file, got {value!r}")
    if path.is_dir():
        raise InputError(f"--out {value} is a folder; give a file path such as {value}/speed.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the folder of --out {value}: {err}; choose a writable"
                         " path") from err
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--out {value} is not writable; choose a writable path")
    check_output(path.with_suffix(".png"), suffixes=FIGURE_SUFFIXES)
    return check_output(path, suffixes=(".json",))


def run_speed_cli(args: argparse.Namespace) -> int:
    """``mag bench speed``: validate everything cheap first, then build models and stream."""

    started = time.time()
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    config = SpeedConfig(policies=policies, frames=args.frames, warmup_blocks=args.warmup_blocks,
                         decode=not args.no_decode, compile=args.compile, rounds=args.rounds,
                         attention=args.attention, profile_blocks=args.profile_blocks,
                         seed=args.seed).validate()
    json_path = _json_path(args.out)
    if args.random_weights and args.model is not None:
        raise ConfigError("--random-weights and --model exclude each other; give one")
    set_threads(args.threads)
    dtype = dtype_from_args(args)
    if args.device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; run on a GPU machine or use"
                          " --device cpu")
    if args.device == "cpu" and config.attention in CUDA_ONLY_ATTENTION:
        raise ConfigError(f"--attention {config.attention} runs on CUDA only; on the CPU use "
                          "auto, flash or"
                          " math")
    models = build_models(args.preset, model=args.weights or args.model,
                          memory_model=args.memory_weights or args.memory_model, policies=policies,
                          wan_dir=args.wan_dir,
                          device=args.device, dtype=dtype, seed=args.seed, steps=args.steps,
                          height=args.height, width=args.width,
                          rope_max_positions=args.rope_max_positions,
                          cache=cache_overrides(args))
    metadata = {
        "benchmark": "speed",
        "command": shlex.join(["mag", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(args.device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }
    report = run_speed(models, config, device=args.device, json_path=json_path, metadata=metadata,
                       progress=not args.no_progress)
    for name, row in report["policies"].items():
        kv = row["kv_bytes"][-1]
        print(f"{name:>10}: {row['fps']:8.2f} fps  p50 {row['latency_ms_p50']:8.1f} ms  p95"
              f" {row['latency_ms_p95']:8.1f} ms  peak {peak_bytes(row) / 2**20:8.1f} MiB"
              f"  KV at {kv[0]} frames {kv[1] / 2**20:.1f} MiB"
              + (f"  x{row['fps_over_window']:.3f} window fps" if "fps_over_window" in row else ""))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')} ({time.time() - started:.1f} s)")
    return 0
