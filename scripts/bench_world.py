"""Measure how fast the panorama world renders on one CPU core, and draw its documentation images.

    .venv/bin/python scripts/bench_world.py            # writes results/world_render.json
                                                       # and docs/img/world_*.png

Rendering speed is a benchmark, not a test: numbers depend on the machine. Threads are pinned to one
(and the process to one core where the OS allows), torch is never imported.
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from mag.io import write_png_strip  # noqa: E402
from mag.io.files import write_json  # noqa: E402
from mag.world import THEMES, WorldConfig, make_clip, make_episode, render_frames, sample_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Offsets per batched render call, repeats of each measurement (the median is reported), and the
# number of episodes / clips timed end to end.
BATCH_FRAMES = 10_000
REPEATS = 7
EPISODES_TIMED = 50
CLIP_FRAMES = 48
TARGET_FRAMES_PER_S = 5_000
# Documentation images: which test episode is drawn, every how many frames, at what upscale.
DOC_EPISODE_INDEX = 3
DOC_EVERY = 6
DOC_SCALE = 2
NEVER_SEEN_GREY = 128


def _median_rate(work: Callable[[], None], items: int) -> float:
    """Items per second of ``work``, median over :data:`REPEATS` runs after one warm-up."""
    work()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return items / statistics.median(times)


def _machine() -> dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mag/world", "mag/io"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def measure() -> dict[str, object]:
    """Frames per second of the renderer and of whole episodes/clips, one core."""
    config = WorldConfig()
    panorama = make_episode("test", 0).panorama
    rng = np.random.default_rng(0)
    whole = np.floor(rng.uniform(0, config.pano_width, BATCH_FRAMES))
    fractional = rng.uniform(0, config.pano_width, BATCH_FRAMES)
    episode = make_episode("test", 0)
    subpixel = WorldConfig(integer_motion=False)

    def render(offsets: np.ndarray) -> Callable[[], None]:
        return lambda: render_frames(panorama, offsets, frame_width=config.frame_width)

    def episodes(cfg: WorldConfig) -> Callable[[], None]:
        return lambda: [make_episode("test", i, config=cfg) for i in range(EPISODES_TIMED)]

    clip_rng = np.random.default_rng(1)
    frames = config.episode_frames
    return {
        "frame_size": [config.frame_height, config.frame_width],
        "render_batch_integer_frames_per_s": _median_rate(render(whole), BATCH_FRAMES),
        "render_batch_subpixel_frames_per_s": _median_rate(render(fractional), BATCH_FRAMES),
        "render_episode_integer_frames_per_s": _median_rate(
            render(episode.offsets.astype(np.float64)), frames
        ),
        "episodes_integer_per_s": _median_rate(episodes(config), EPISODES_TIMED),
        "episodes_subpixel_per_s": _median_rate(episodes(subpixel), EPISODES_TIMED),
        "sample_clip_frames_per_s": _median_rate(
            lambda: [sample_clip(clip_rng, CLIP_FRAMES, config) for _ in range(EPISODES_TIMED)],
            EPISODES_TIMED * CLIP_FRAMES,
        ),
        "episode_frames": frames,
        "clip_frames": CLIP_FRAMES,
        "batch_frames": BATCH_FRAMES,
        "repeats": REPEATS,
        "target_frames_per_s": TARGET_FRAMES_PER_S,
    }


def draw_images(folder: Path) -> list[Path]:
    """One panorama per theme, and one episode's history / future frames."""
    panoramas = [make_clip(seed, 1, WorldConfig(themes=(name,))).panorama
                 for seed, name in enumerate(THEMES)]
    written = [write_png_strip(folder / "world_panoramas.png", panoramas, list(THEMES),
                               scale=DOC_SCALE)]
    ep = make_episode("test", DOC_EPISODE_INDEX)
    kept = np.arange(0, len(ep.frames), DOC_EVERY)
    history, future = kept[kept < ep.switch_frame], kept[kept >= ep.switch_frame]
    seen, _ = ep.last_seen()
    labels = [f"test episode {DOC_EPISODE_INDEX}: {ep.prompt}",
              f"history (frames {history[0]}-{history[-1]}, every {DOC_EVERY}; turn at "
              f"{ep.turn_frame})",
              f"after the switch at {ep.switch_frame} (frames {future[0]}-{future[-1]})",
              "the history frame showing the same view (last_seen); grey: a view never seen before"]
    oracle = np.where((seen[future] >= 0)[:, None, None, None], ep.frames[np.maximum(seen[future],
                                                                                     0)],
                      NEVER_SEEN_GREY)
    rows = [ep.panorama, ep.frames[history], ep.frames[future], oracle.astype(np.uint8)]
    written.append(write_png_strip(folder / "world_episode.png", rows, labels, scale=DOC_SCALE))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "results" / "world_render.json")
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "img",
                        help="folder for world_*.png (default docs/img)")
    parser.add_argument("--no-images", action="store_true", help="skip the documentation images")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = {
        "benchmark": "world_render",
        "command": "python scripts/bench_world.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": _machine(),
        "threads": 1,
        "results": measure(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result, allow_nan=True)
    for key, value in result["results"].items():
        if key.endswith("_per_s"):
            print(f"{key:40s} {value:12,.0f}")
    print(f"wrote {args.output}")
    if not args.no_images:
        for path in draw_images(args.images):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
