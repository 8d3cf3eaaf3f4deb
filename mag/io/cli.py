"""Command-line flags every ``mag`` command shares, declared once: the output path, the runtime and
the dtype."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from mag.errors import ConfigError

# torch intra-op threads unless --threads says otherwise: the tiny models' small matmuls run fastest
# on one thread, and more stall on a busy CPU (docs/performance.md).
DEFAULT_THREADS = 1
DEFAULT_DEVICE = "cpu"
# ``--dtype`` names: weights, activations and KV cache of the models a command loads.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AUTO_DTYPE = "auto"  # bfloat16 on a CUDA device, float32 elsewhere (resolve_dtype)


def add_out_argument(parser: argparse.ArgumentParser, help: str, *, required: bool = True,
                     dest: str = "out") -> None:
    """``-o/--out``: where a command writes its output (a file or a folder, as ``help`` says)."""
    parser.add_argument("-o", "--out", dest=dest, required=required, help=help)


def add_runtime_arguments(parser: argparse.ArgumentParser, *, devices: Sequence[str] | None = None,
                          dest_prefix: str = "") -> None:
    """``--device`` (default cpu) and ``--threads`` (default :data:`DEFAULT_THREADS`)."""
    parser.add_argument("--device", dest=f"{dest_prefix}device", default=DEFAULT_DEVICE,
                        choices=tuple(devices) if devices else None,
                        help=f"torch device (default {DEFAULT_DEVICE})")
    parser.add_argument("--threads", dest=f"{dest_prefix}threads", type=int,
                        default=DEFAULT_THREADS,
                        help=f"torch intra-op threads on the CPU (default {DEFAULT_THREADS})")


def add_dtype_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--dtype`` (default :data:`AUTO_DTYPE`); read it with :func:`dtype_from_args`."""
    parser.add_argument("--dtype", default=AUTO_DTYPE, choices=(AUTO_DTYPE, *DTYPES),
                        help="weights, activations and KV cache dtype (default auto: bfloat16 on a"
                             " cuda device, as the official inference runs, float32 elsewhere)")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The one ``--dtype`` rule: a named dtype is itself; ``auto`` is bfloat16 on CUDA, else
    float32."""
    if name == AUTO_DTYPE:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def dtype_from_args(args: argparse.Namespace) -> torch.dtype:
    """The dtype ``args.dtype`` names on ``args.device`` (:func:`resolve_dtype`)."""
    return resolve_dtype(args.dtype, args.device)


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
