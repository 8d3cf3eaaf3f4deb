"""Command-line flags every ``mag`` command shares, declared once: the output path and the runtime."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from mag.errors import ConfigError

# torch intra-op threads unless --threads says otherwise: the tiny models' small matmuls run fastest on one
# thread, and more stall on a busy CPU (docs/performance.md).
DEFAULT_THREADS = 1
DEFAULT_DEVICE = "cpu"


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
    parser.add_argument("--threads", dest=f"{dest_prefix}threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch intra-op threads on the CPU (default {DEFAULT_THREADS})")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
