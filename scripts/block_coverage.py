"""What a block's last frame lacks, over training clips of a recipe's world (issue 17: does
compression carry anything the kept last frames do not?).

Per block: the share of its distinct panorama columns that its last frame does not show. Per clip:
the share of the columns the clip showed that neither the sink frames nor any block's last frame
shows -- what keeping them (``downsample``) loses for good, and only a memory model could carry.
``--speed`` replaces the world's camera speed (px/frame). Usage::

    python scripts/block_coverage.py --recipe recipes/tiny-memory.toml --clips 256 [--speed 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mag.io.files import write_json
from mag.train.data import preset_world
from mag.train.recipe import load_recipe
from mag.world import sample_clip


def block_shares(offsets: np.ndarray, frame_width: int, pano_width: int,
                 frames_per_block: int) -> np.ndarray:
    """Per block, the share of its distinct columns that its last frame does not show."""
    shares = []
    for start in range(0, len(offsets) - frames_per_block + 1, frames_per_block):
        seen = [set((int(round(o)) + np.arange(frame_width)) % pano_width)
                for o in offsets[start:start + frames_per_block]]
        union = set().union(*seen)
        shares.append(len(union - seen[-1]) / len(union))
    return np.asarray(shares)


def clip_share(offsets: np.ndarray, frame_width: int, pano_width: int, frames_per_block: int,
               sink_frames: int) -> float:
    """Share of the columns a clip shows that neither the sink frames nor any block's last frame
    show (what ``downsample`` keeps)."""
    def columns(frames: np.ndarray) -> set[int]:
        return set().union(*(set((int(round(o)) + np.arange(frame_width)) % pano_width)
                             for o in frames))
    shown = columns(offsets)
    kept = columns(np.concatenate([offsets[:sink_frames],
                                   offsets[frames_per_block - 1::frames_per_block]]))
    return len(shown - kept) / len(shown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="training recipe whose world to sample")
    parser.add_argument("--clips", type=int, default=256, help="training clips to sample")
    parser.add_argument("--speed", type=int, help="camera speed in px/frame (default: the world's)")
    parser.add_argument("-o", "--out", type=Path, help="write the JSON summary here")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    preset = recipe.build_preset()
    overrides = dict(recipe.data.world)
    if args.speed is not None:
        overrides.update(speed_range_px=(args.speed, args.speed), speed_quantum_px=args.speed)
    world = preset_world(preset, overrides)
    fpb = preset.cache.frames_per_block
    clips = [sample_clip(np.random.default_rng([0, i]), recipe.data.clip_frames, world).offsets
             for i in range(args.clips)]
    shares = np.concatenate([block_shares(o, world.frame_width, world.pano_width, fpb)
                             for o in clips])
    sinks = preset.cache.memory_sink_frames
    lost = np.asarray([clip_share(o, world.frame_width, world.pano_width, fpb, sinks)
                       for o in clips])
    summary = {"recipe": recipe.name, "clips": args.clips, "blocks": int(shares.size),
               "speed_px": list(world.speed_range_px), "frame_width": world.frame_width,
               "frames_per_block": fpb,
               "block_share_not_in_its_last_frame": float(shares.mean()),
               "clip_share_in_no_last_frame": float(lost.mean()),
               "clips_losing_columns": float((lost > 0).mean())}
    print(json.dumps(summary, indent=1))
    if args.out:
        write_json(args.out, summary, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
