"""The ``mag`` command line. Each area registers its own subcommands; errors print one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from mag import __version__
from mag.errors import InputError, MagError
from mag.io.text import check_text

# Modules exposing ``register(subparsers)``; each adds its subcommands with
# ``set_defaults(func=...)``.
COMMAND_MODULES: list[str] = [
    "mag.world.cli",
    "mag.info",
    "mag.train.cli",
    "mag.data.encode",
    "mag.registry",
    "mag.bench.cli",
    "mag.text.cli",
    "mag.demo",
    "mag.generate",
    "mag.serve",
    "mag.weights.cli",
]


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line on stderr and exit 2, like every other error (``mag X -h`` shows
    usage).

    Its subcommands' parsers are of this class too (argparse builds them with the parent's
    class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} -h\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mag",
        description="Memorize-and-Generate: streaming video generation with compressed long-term "
                    "memory.",
    )
    parser.add_argument("--version", action="version", version=f"mag {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:

    return __version__


# Device types a command may run on (torch knows more, e.g. "xla", that this project never tests).
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str, option: str = "--device") -> torch.device:
    """``name`` as a torch device this machine has, or a one-line InputError (before any work)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise InputError(
            f"{option} {name!r} is not a device; use cpu or cuda (cuda:N for one GPU)"
        ) from err
    if device.type not in DEVICE_TYPES:
        raise InputError(f"{option} {name!r}: device type {device.type!r} is not supported; use "
                         "one of"
                         f" {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{option} {name}: torch sees no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise InputError(f"{option} {name}: this machine has {count} CUDA device(s), cuda:0 to"
                             f" cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{option} {name}: torch sees no MPS device here; use --device cpu")
    return device


def check_arguments(args: argparse.Namespace) -> None:
    """Checks every command shares, run before the command: devices exist, text options encode."""
    for key, value in vars(args).items():
        if key.endswith("device") and isinstance(value, str):
            check_device(value)
        if key == "prompt" and value is not None:
            for text in value if isinstance(value, list) else [value]:
                check_text(text, "--prompt")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        result = args.func(args)
    except MagError as err:
        print(f"mag: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mag: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
