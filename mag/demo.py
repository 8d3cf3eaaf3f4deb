"""``mag demo``: one held-out backtracking episode, generated under MAG's compressed memory and
under a sliding window from the same switch point and the same noise, side by side with the ground
truth; ``--long``: an A -> B -> A loop episode whose return comes hundreds of frames later, under
the two-tier memory (``archive``) and the window.

The episode's history is fed into each policy's cache, then the rest is generated through the
consistency benchmark's own streaming loop; revisit PSNR compares generated frames with the history
frame of the same view. One episode is an illustration; the measurement is ``mag bench
consistency``. :class:`DemoConfig` (in :mod:`mag.app`) names the default models and sampler.
Details: docs/generate.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mag.app import (
    DEFAULTS,
    DemoConfig,
    LoadedModels,
    add_model_arguments,
    config_from_args,
    load_models,
    sampler_config,
    set_threads,
)
from mag.bench.consistency import (
    BenchEpisode,
    bench_world,
    build_policies,
    episode_summary,
    score_episode,
    stream_episodes,
    within_window,
    world_episodes,
)
from mag.checkpoint import git_commit
from mag.codecs import get_codec_for
from mag.errors import ConfigError, InputError
from mag.io.cli import add_out_argument, dtype_from_args
from mag.io.files import write_json
from mag.io.paths import check_output_dir
from mag.io.video import write_mp4, write_png_strip
from mag.pipelines import StreamingGenerator
from mag.schedulers import FlowMatchScheduler

__all__ = ["DEMO_POLICIES", "compose_panels", "run_demo"]



# The two policies compared side by side, in panel order after the ground truth.
DEMO_POLICIES: tuple[str, ...] = ("mag", "window")
# ``--long``: the loop world, its policies and the models trained for it (when not given).
LONG_WORLD = "loop-600"
LONG_POLICIES: tuple[str, ...] = ("archive", "window")
LONG_MODEL, LONG_MEMORY_MODEL = "tiny-horizon", "tiny-horizon-memory"
POLICY_LABELS = {"mag": "MAG", "archive": "MAG archive", "window": "window"}
GROUND_TRUTH_LABEL = "ground truth"
# Nearest-neighbour upscale of the 16x16 frames in the video (128x128 panels) and in the strip.
VIDEO_SCALE = 8
STRIP_SCALE = 4
# Playback rate of demo.mp4 (slower than the world's 16 fps so the revisit is easy to follow).
DEMO_FPS = 8.0
# Text bands above (labels) and below (frame status) the panels, and the gap between panels (px).
LABEL_BAND_PX = 16
STATUS_BAND_PX = 16
PANEL_GAP_PX = 4
BAND_BACKGROUND = (0, 0, 0)
BAND_TEXT = (255, 255, 255)
REVISIT_TEXT = (255, 220, 80)
# Columns of revisit.png at most (evenly spaced over the revisited frames).
MAX_STRIP_FRAMES = 12
DEFAULT_EPISODE = 0
DEFAULT_SEED = 0


# ---------------------------------------------------------------------------------------------
# Frames with labels


def _band(width: int, height: int, texts: list[tuple[int, str, tuple[int, int,
                                                                     int]]]) -> np.ndarray:
    """A black ``[height, width, 3]`` uint8 band with each ``(x, text, colour)`` drawn at ``x``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), BAND_BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, text, colour in texts:
        draw.text((x + 2, 2), text, fill=colour)
    return np.asarray(image)


def compose_panels(panels: list[np.ndarray], labels: list[str], statuses: list[str],
                   highlight: np.ndarray | None = None, *, scale: int = VIDEO_SCALE) -> np.ndarray:
    """Panels side by side under their labels, above a per-frame status line: uint8 ``[T, H', W',
    3]``.

    Args:
        panels: each uint8 ``[T, H, W, 3]`` (same shape).
        labels: one text per panel, drawn above it.
        statuses: one text per frame, drawn below the panels.
        highlight: bool ``[T]``: frames whose status is drawn in the highlight colour (revisits).
    """
    if not panels or len(panels) != len(labels):
        raise InputError(f"compose_panels needs one label per panel, got {len(panels)} panels and"
                         f" {len(labels)} labels")
    count = panels[0].shape[0]
    if any(p.shape != panels[0].shape for p in panels) or len(statuses) != count:
        raise InputError("compose_panels needs panels of one shape and one status per frame")
    up = [p.repeat(scale, axis=1).repeat(scale, axis=2) for p in panels]
    height, width = up[0].shape[1:3]
    total_width = len(up) * width + (len(up) - 1) * PANEL_GAP_PX
    top = _band(total_width, LABEL_BAND_PX, [(i * (width + PANEL_GAP_PX), label, BAND_TEXT)
                                             for i, label in enumerate(labels)])
    out = np.zeros((count, LABEL_BAND_PX + height + STATUS_BAND_PX, total_width, 3), dtype=np.uint8)
    out[:, :LABEL_BAND_PX] = top
    for i, panel in enumerate(up):
        x = i * (width + PANEL_GAP_PX)
        out[:, LABEL_BAND_PX:LABEL_BAND_PX + height, x:x + width] = panel
    for t, status in enumerate(statuses):
        colour = REVISIT_TEXT if highlight is not None and highlight[t] else BAND_TEXT
        out[t, LABEL_BAND_PX + height:] = _band(total_width, STATUS_BAND_PX, [(0, status, colour)])
    return out


# ---------------------------------------------------------------------------------------------
# The demo


@dataclass
class DemoResult:
    """What one demo run produced: generated frames per policy and their scores."""

    episode: BenchEpisode
    frames: dict[str, np.ndarray]  # policy -> uint8 [num_generate, H, W, 3], in panel order
    summaries: dict[str, dict[str, Any]]  # policy -> consistency episode_summary
    within: np.ndarray  # bool [num_generate]: history match within the window's attention


def run_demo(loaded: LoadedModels, config: DemoConfig, *, episode_index: int = DEFAULT_EPISODE,
             seed: int = DEFAULT_SEED, split: str = "test", progress: bool = True,
             long: bool = False) -> DemoResult:
    """Generate test episode ``episode_index`` under :data:`DEMO_POLICIES` (``long``: episode of
    :data:`LONG_WORLD` under :data:`LONG_POLICIES`) with the same noise; score it."""
    import torch
    from tqdm.auto import tqdm

    if episode_index < 0:
        raise ConfigError(f"--episode must be >= 0, got {episode_index}")
    preset, model = loaded.preset, loaded.model
    policies = build_policies(LONG_POLICIES if long else DEMO_POLICIES, preset,
                              memory_model=loaded.memory, empty_context=loaded.empty_context)
    if long:
        world, _ = bench_world(preset, name=LONG_WORLD)
    else:
        # Episodes as long as the generator's training clips: longer ones are out of its
        # distribution.
        try:
            world, _ = bench_world(preset, training_world=loaded.training_world(),
                                   episode_frames=loaded.clip_frames())
        except ConfigError:  # clips shorter than a return trip: the world's own episode length
            world, _ = bench_world(preset, training_world=loaded.training_world())
    episode = world_episodes(world, split=split, count=1, start=episode_index)[0]
    context = loaded.encode([episode.prompt])
    codec = get_codec_for(preset.video)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    sampler = sampler_config(config)
    blocks = episode.num_generate // preset.cache.frames_per_block
    within = within_window(episode.frame_indices, episode.history_match, preset.cache)
    frames, summaries = {}, {}
    with tqdm(total=blocks * len(policies), desc="mag demo", unit="block",
              disable=not progress) as bar:
        for name, (policy, writer) in policies.items():
            bar.set_postfix_str(name)
            gen = StreamingGenerator(model, scheduler, preset, policy, sampler=sampler,
                                     writer=writer)
            noise = torch.Generator(device=gen.device).manual_seed(seed)
            pred = stream_episodes(gen, codec, [episode], context, False, noise,
                                   on_block=lambda: bar.update())
            frames[name] = pred[0]
            scores = score_episode(pred[0], episode, with_lpips=False)
            summaries[name] = episode_summary(scores, episode, within)
    return DemoResult(episode, frames, summaries, within)


def _frame_statuses(result: DemoResult) -> tuple[list[str], np.ndarray]:
    """Status text and revisit flag of every episode frame (history, generated, revisit)."""
    ep = result.episode
    s = ep.switch_frame
    statuses = [f"frame {t}: history (fed to the cache)" for t in range(s)]
    highlight = [False] * s
    for j, t in enumerate(ep.frame_indices):
        seen = int(ep.history_match[j])
        if seen < 0:
            statuses.append(f"frame {t}: generated, new view")
            highlight.append(False)
        else:
            where = "within window" if result.within[j] else "beyond window"
            statuses.append(f"frame {t}: revisit of frame {seen} ({where})")
            highlight.append(not result.within[j])
    return statuses, np.asarray(highlight)


def write_demo_video(path: Path, result: DemoResult) -> Path:
    """``ground truth | MAG | window`` over the whole episode; history frames show the truth in each
    panel."""

    ep = result.episode
    s = ep.switch_frame
    truth = ep.frames[:s + ep.num_generate]
    panels = [truth] + [np.concatenate([truth[:s], result.frames[name]]) for name in result.frames]
    labels = [GROUND_TRUTH_LABEL] + [POLICY_LABELS[name] for name in result.frames]
    statuses, highlight = _frame_statuses(result)
    video = compose_panels(panels, labels, statuses, highlight)
    return write_mp4(path, video, DEMO_FPS, scale=1)


def revisit_columns(result: DemoResult) -> np.ndarray:
    """Generated-frame indices shown in the strip: beyond-window revisits (else all revisits), at
    most :data:`MAX_STRIP_FRAMES`, evenly spaced."""
    revisited = result.episode.history_match >= 0
    chosen = np.flatnonzero(revisited & ~result.within)
    if chosen.size == 0:
        chosen = np.flatnonzero(revisited)
    if chosen.size > MAX_STRIP_FRAMES:
        chosen = chosen[np.linspace(0, chosen.size - 1, MAX_STRIP_FRAMES).round().astype(int)]
    return chosen


def write_revisit_strip(path: Path, result: DemoResult) -> Path:
    """Rows: the history frame of the same view, the truth, MAG, window, at the revisited frames."""

    ep = result.episode
    columns = revisit_columns(result)
    if columns.size == 0:
        raise ConfigError(f"episode {ep.name} has no revisited frame after its switch; pick another"
                          " --episode")
    first, last = int(ep.frame_indices[columns[0]]), int(ep.frame_indices[columns[-1]])
    rows = [ep.frames[ep.history_match[columns]], ep.frames[ep.frame_indices[columns]]]
    labels = [f"history: the same view, seen before frame {ep.switch_frame}",
              f"ground truth, frames {first}-{last}"]
    for name in result.frames:
        rows.append(result.frames[name][columns])
        labels.append(f"{POLICY_LABELS[name]}: beyond-window revisit PSNR "
                      f"{_db(revisit_psnr(result, name))}")
    return write_png_strip(path, rows, labels, scale=STRIP_SCALE)


def revisit_psnr(result: DemoResult, policy: str, category: str = "beyond") -> float | None:
    """PSNR (dB, of the mean MSE) vs the history frame of the same view over ``category`` revisits
    (``all``, ``within`` or ``beyond`` the window's attention)."""
    entry = result.summaries[policy]["vs_history"]
    return entry["psnr"] if category == "all" else entry[category]["psnr"]


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} dB"


def demo_record(result: DemoResult, config: DemoConfig, loaded: LoadedModels, seconds: float,
                seed: int, device: str) -> dict[str, Any]:
    """The contents of ``demo.json``."""

    ep = result.episode
    revisited = ep.history_match >= 0
    policies = {}
    for name in result.frames:
        summary = result.summaries[name]
        policies[name] = {
            "revisit_psnr_db": {category: revisit_psnr(result, name, category)
                                for category in ("all", "within", "beyond")},
            "revisit_ssim": summary["vs_history"]["ssim"],
            "vs_gt_psnr_db": summary["vs_gt"]["psnr"],
        }
    return {
        "episode": {"split": "test", "index": int(ep.name), "prompt": ep.prompt,
                    "switch_frame": ep.switch_frame, "generated_frames": ep.num_generate,
                    "total_frames": ep.switch_frame + ep.num_generate,
                    "revisited_frames": ep.frame_indices[revisited].tolist(),
                    "beyond_window_frames": ep.frame_indices[revisited & ~result.within].tolist()},
        "policies": policies,
        "config": {**asdict(config), "seed": seed, "device": device},
        "models": loaded.records(config),
        "window": {"sink_frames": loaded.preset.cache.sink_frames,
                   "window_frames": loaded.preset.cache.window_frames},
        "seconds": round(seconds, 1),
        "commit": git_commit(),
        "note": "one episode, for illustration; `mag bench consistency` measures all 176 test "
                "episodes",
    }


# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="MAG vs sliding window on a held-out episode that revisits what it saw (mp4 "
                     "+ PNG)",
        description="Feed a held-out test episode's history into the KV cache, generate the rest "
                    "with the MAG"
                    " policy (the memory model writes the cache) and with the window policy from "
                    "the same"
                    " switch point and noise, and write DIR/demo.mp4 (ground truth | MAG | window),"
                    " DIR/revisit.png and DIR/demo.json; prints each policy's revisit PSNR.")
    add_out_argument(p, "output folder")
    p.add_argument("--episode", type=int, default=DEFAULT_EPISODE,
                   help=f"test-split episode index (default {DEFAULT_EPISODE})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed (the same for both "
                                                                  "policies)")
    p.add_argument("--long", action="store_true",
                   help=f"a long return instead: a held-out {LONG_WORLD} episode (A -> B -> A, back"
                        " to A a few hundred frames later) under the two-tier memory (archive) and"
                        f" the window; the default models become {LONG_MODEL} and"
                        f" {LONG_MEMORY_MODEL}")
    add_model_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # None: the defaults of the chosen demo (the short one's are in the --model help).
    p.set_defaults(func=_cmd_demo, model=None, memory_model=None)


def _cmd_demo(args: argparse.Namespace) -> int:
    started = time.time()
    set_threads(args.threads)
    model, memory = (LONG_MODEL, LONG_MEMORY_MODEL) if args.long else (DEFAULTS.model,
                                                                       DEFAULTS.memory_model)
    args.model, args.memory_model = args.model or model, args.memory_model or memory
    config = config_from_args(args)
    sampler_config(config)
    out = check_output_dir(args.out)
    loaded = load_models(config, device=args.device, dtype=dtype_from_args(args))
    result = run_demo(loaded, config, episode_index=args.episode, seed=args.seed,
                      progress=not args.no_progress, long=args.long)
    write_demo_video(out / "demo.mp4", result)
    write_revisit_strip(out / "revisit.png", result)
    record = demo_record(result, config, loaded, time.time() - started, args.seed, args.device)
    write_json(out / "demo.json", record, indent=1)
    ep = result.episode
    print(f"test episode {ep.name}: {ep.switch_frame} history frames, {ep.num_generate} generated,"
          f" {len(record['episode']['beyond_window_frames'])} revisit a view beyond the window")
    for name in result.frames:
        psnr = record["policies"][name]["revisit_psnr_db"]
        print(f"{POLICY_LABELS[name]:>11}: revisit PSNR {_db(psnr['beyond'])} beyond the window,"
              f" {_db(psnr['all'])} over all revisits")
    print(f"wrote {out / 'demo.mp4'}, {out / 'revisit.png'}, {out / 'demo.json'} "
          f"({record['seconds']} s)")
    return 0
