"""The ``mag`` command line. Each area registers its own subcommands; errors print one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mag import __version__
from mag.errors import MagError

# Modules exposing ``register(subparsers)``; each adds its subcommands with ``set_defaults(func=...)``.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mag",
        description="Memorize-and-Generate: streaming video generation with compressed long-term memory.",
    )
    parser.add_argument("--version", action="version", version=f"mag {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
