"""``mag world preview`` (episode to mp4) and ``mag world show`` (episode to a PNG strip)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mag.errors import InputError
from mag.io.cli import add_out_argument
from mag.io.files import check_output
from mag.io.video import (
    DEFAULT_CRF,
    DEFAULT_SCALE,
    PNG_SUFFIXES,
    check_mp4_output,
    write_mp4,
    write_png_strip,
)
from mag.world.episodes import SPLIT_SEEDS, Episode, make_episode
from mag.world.panorama import THEMES, WORLD_PRESETS, get_world_config

# Frame rate of previews (the tiny preset's video fps).
DEFAULT_PREVIEW_FPS = 16
# `mag world show`: one frame every this many, drawn this many times larger.
DEFAULT_SHOW_EVERY = 6
DEFAULT_SHOW_SCALE = 2
# Theme names without spaces for the command line ("desert-at-dusk").
_THEME_SLUGS = {name.replace(" ", "-"): name for name in THEMES}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mag world`` and its subcommands."""
    world = subparsers.add_parser(
        "world", help="the procedural panorama world (episodes, previews)",
        description="Seeded cylindrical panoramas seen by a backtracking camera: exact ground truth"
                    " for the tiny model and the benchmark.",
    )
    commands = world.add_subparsers(dest="world_command", metavar="SUBCOMMAND", required=True)

    preview = commands.add_parser(
        "preview", help="write an episode as an mp4",
        description="Render episode INDEX of a split and write its first FRAMES frames as an "
                    "H.264 mp4.",
    )
    _episode_arguments(preview)
    preview.add_argument("--fps", type=float, default=DEFAULT_PREVIEW_FPS,
                         help="frame rate (default %(default)s)")
    preview.add_argument("--scale", type=int, default=DEFAULT_SCALE,
                         help="nearest-neighbour upscale before encoding (default %(default)s)")
    preview.add_argument("--crf", type=int, default=DEFAULT_CRF,
                         help="x264 quality, 0 = lossless (default %(default)s)")
    add_out_argument(preview, "mp4 file to write")
    preview.set_defaults(func=_preview)

    show = commands.add_parser(
        "show", help="write an episode's panorama and frames as a PNG strip",
        description="Render episode INDEX and save its panorama plus every EVERY-th frame as one "
                    "PNG.",
    )
    _episode_arguments(show)
    show.add_argument("--every", type=int, default=DEFAULT_SHOW_EVERY,
                      help="keep one frame in this many (default %(default)s)")
    show.add_argument("--scale", type=int, default=DEFAULT_SHOW_SCALE, help="upscale (default "
                                                                            "%(default)s)")
    add_out_argument(show, "PNG file to write")
    show.set_defaults(func=_show)


def _episode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", choices=list(SPLIT_SEEDS),
                        help="seed range (default %(default)s)")
    parser.add_argument("--index", type=int, default=0, help="episode index in the split (default "
                                                             "0)")
    parser.add_argument("--seed-base", type=int, default=None,
                        help="use seed SEED_BASE + INDEX instead of the split's seed range")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames to render (default: the world's episode length)")
    parser.add_argument("--world", default="default", choices=list(WORLD_PRESETS),
                        help="named world configuration (default %(default)s)")
    parser.add_argument("--theme", default=None, choices=list(_THEME_SLUGS), help="force one theme")
    parser.add_argument("--subpixel", action="store_true", help="sub-pixel camera motion "
                                                                "(default: whole px)")


def _episode(args: argparse.Namespace) -> Episode:
    overrides: dict[str, object] = {}
    if args.theme is not None:
        overrides["themes"] = (_THEME_SLUGS[args.theme],)
    if args.subpixel:
        overrides["integer_motion"] = False
    config = get_world_config(args.world, **overrides)
    if args.frames is not None:
        if args.frames <= 0:
            raise InputError(f"--frames must be positive, got {args.frames}")
        # Longer episodes only extend the return leg, so the first frames do not depend on --frames.
        config = config.replace(episode_frames=max(args.frames, config.episode_frames))
    episode = make_episode(args.split, args.index, seed_base=args.seed_base, config=config)
    print(f"episode {episode.split}/{episode.index} (seed {episode.seed}), theme: {episode.theme}")
    print(f"prompt: {episode.prompt}")
    print(f"turn frame {episode.turn_frame}, switch frame {episode.switch_frame}"
          f" (frames before it are history)")
    return episode


def _preview(args: argparse.Namespace) -> int:
    check_mp4_output(args.out)  # before the episode is rendered
    episode = _episode(args)
    count = args.frames or len(episode.frames)
    path = write_mp4(Path(args.out), episode.frames[:count], args.fps, scale=args.scale,
                     crf=args.crf)
    print(f"wrote {count} frames ({episode.frames.shape[2]}x{episode.frames.shape[1]} px, "
          f"x{args.scale}"
          f" upscaled, {args.fps:g} fps) to {path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    check_output(args.out, suffixes=PNG_SUFFIXES)  # before the episode is rendered
    episode = _episode(args)
    if args.every <= 0:
        raise InputError(f"--every must be positive, got {args.every}")
    count = args.frames or len(episode.frames)
    kept = list(range(0, count, args.every))
    history = [t for t in kept if t < episode.switch_frame]
    future = [t for t in kept if t >= episode.switch_frame]
    rows = [episode.panorama]
    labels = [f"panorama ({episode.theme})"]
    if history:
        rows.append(episode.frames[history])
        labels.append(f"history, frames {history[0]}..{history[-1]} every {args.every}")
    if future:
        rows.append(episode.frames[future])
        labels.append(f"after the switch, frames {future[0]}..{future[-1]} every {args.every}")
    path = write_png_strip(args.out, rows, labels, scale=args.scale)
    print(f"wrote {path}")
    return 0
