"""Episodes of the consistency benchmark: panorama-world test episodes, or real videos with a switch
table.

An episode is a history (fed clean into the cache) followed by frames to generate; every generated
frame knows the frame that last showed the same view (``history_match``) and how long ago (``gap``):
among the history frames, or under ``--teacher-forced`` among every true frame the cache holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mag.config import CacheConfig, Preset
from mag.errors import ConfigError, InputError
from mag.io.video import read_mp4
from mag.train.data import preset_world
from mag.world import SPLIT_SEEDS, WorldConfig, camera_track, last_seen, make_episode

SWITCH_TIMES_FILE = "switch_times.json"
UINT8_LEVELS = 255.0
RGB_BYTES = 3  # bytes of one uint8 RGB pixel


# ---------------------------------------------------------------------------------------------
# Episodes


@dataclass(frozen=True, eq=False)
class BenchEpisode:
    """One benchmark case, already at the model's frame size.

    Attributes:
        name: file stem of its per-episode JSON (world: the episode index; videos: the file stem).
        frames: uint8 ``[T, H, W, 3]`` ground truth, ``T >= switch_frame + num_generate``.
        switch_frame: frames ``[0, switch_frame)`` are history (a multiple of the block size).
        num_generate: generated frames after the switch (whole blocks). prompt: text prompt of the
        stream. history_match: int64 ``[num_generate]``: the latest frame showing the same view
        that the model was given as ground truth (a history frame; teacher-forced world episodes:
        any frame before the generated frame's block), -1 where none. camera_px: float32 ``[T]``
        unwrapped horizontal camera track (px, relative to frame 0), or None when unknown (real
        videos). Camera-anchored models (``dit.camera_rope``) need it.
    """

    name: str
    frames: np.ndarray
    switch_frame: int
    num_generate: int
    prompt: str
    history_match: np.ndarray
    camera_px: np.ndarray | None = None

    @property
    def frame_indices(self) -> np.ndarray:
        """Absolute indices ``[num_generate]`` of the generated frames."""
        return np.arange(self.switch_frame, self.switch_frame + self.num_generate)

    @property
    def gaps(self) -> np.ndarray:
        """Frames since each generated frame's view was last given as ground truth (-1: never)."""
        return np.where(self.history_match >= 0, self.frame_indices - self.history_match, -1)


def within_window(frame_index: np.ndarray, seen_index: np.ndarray,
                  cache: CacheConfig) -> np.ndarray:
    """Whether the window policy still attends to history frame ``seen_index`` when frame
    ``frame_index`` is generated: a sink frame, or one of the ``window_frames`` frames before the
    frame's block."""
    block_start = (frame_index // cache.frames_per_block) * cache.frames_per_block
    return (seen_index >= 0) & ((seen_index < cache.sink_frames)
                                | (seen_index >= block_start - cache.window_frames))


def bench_world(preset: Preset, *, name: str | None = None, training_world: dict[str,
                                                                                 Any] | None = None,
                excursion_scale: float = 1.0, frames_after: int | None = None,
                episode_frames: int | None = None) -> tuple[WorldConfig, str]:
    """The benchmark's world at the model's frame size, and where it came from.

    ``name`` (``--world``) wins; else the training world of the checkpoint (``recipe.data.world``,
    so the benchmark matches the training distribution); else ``default``. Either way the frames
    take the preset's video size (panorama as high as the frame unless the world says otherwise, as
    in training), trajectories are the benchmark's 2-leg backtracks, excursions are scaled by
    ``excursion_scale``, and episodes are long enough for the return leg and ``frames_after``.
    ``episode_frames`` fixes the episode length instead (it must still fit the return leg). A loop
    world (``trajectory = "loop"``) keeps its own layout: only ``episode_frames`` applies, and it
    moves the return (anchored at the episode end).
    """
    if not excursion_scale > 0:
        raise ConfigError(f"excursion scale must be > 0, got {excursion_scale}")
    block = preset.cache.frames_per_block
    source = f"--world {name}" if name else "default"
    overrides = None
    if name is None and training_world:
        overrides = training_world
        source = "checkpoint recipe.data.world"
    world = preset_world(preset, overrides, name or "default")
    if world.trajectory == "loop":
        if excursion_scale != 1.0:
            raise ConfigError("--excursion-scale scales backtrack excursions; a loop world draws"
                              " its dwell from dwell_frames_range")
        return (world if episode_frames is None else world.replace(episode_frames=episode_frames),
                source)
    low, high = world.excursion_frames_range
    excursion = (max(1, round(low * excursion_scale)), max(1, round(high * excursion_scale)))
    pause = world.pause_frames_range[1]
    # Longest path to the switch: excursion + pause + 1 (turn) + up to two blocks
    # (switch_frame_for).
    latest_switch = excursion[1] + pause + 1 + 2 * block
    needed = max(2 * excursion[1] + pause + 2 * block, latest_switch + (frames_after or 0))
    if episode_frames is not None and episode_frames < needed:
        raise ConfigError(f"--episode-frames {episode_frames} is too short: this world's longest "
                          "excursion,"
                          f" its return and the switch need {needed} frames")
    world = world.replace(legs_range=(2, 2), excursion_frames_range=excursion,
                          episode_frames=episode_frames or max(world.episode_frames, needed))
    return world, source


def world_episodes(world: WorldConfig, *, split: str = "test", count: int,
                   seed_base: int | None = None, frames_after: int | None = None, start: int = 0,
                   teacher_forced: bool = False) -> list[BenchEpisode]:
    """Panorama-world episodes ``start .. start+count-1`` of ``split`` as benchmark cases.

    ``history_match`` looks for a generated frame's view among the history frames; with
    ``teacher_forced``, among every frame before the frame's block (the true blocks before it are in
    the cache too). On backtracks, which never repeat a view after the switch, both give the same.
    """
    if count <= 0:
        raise ConfigError(f"the benchmark needs at least one episode, got {count}")
    available = len(SPLIT_SEEDS[split]) - start if seed_base is None else count
    if count > available:
        raise ConfigError(f"split {split!r} has {available} episodes from index {start}; asked "
                          f"for {count}")
    need = count * world.episode_frames * world.frame_height * world.frame_width * RGB_BYTES
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:  # the episodes are held in memory: refuse before building them
        raise ConfigError(f"{count} episodes of {world.episode_frames} frames need "
                          f"{need / 2**30:.1f} GiB of"
                          f" frames, more than the {free / 2**30:.1f} GiB free; ask for fewer "
                          "episodes")
    block = world.block_frames
    out = []
    for index in range(start, start + count):
        ep = make_episode(split, index, seed_base=seed_base, config=world)
        s, total = ep.switch_frame, ep.num_frames
        n = _whole_blocks(frames_after if frames_after is not None else total - s, block)
        if n < block or s + n > total:
            raise ConfigError(f"episode {split}/{index} has {total - s} frames after its switch "
                              f"at {s};"
                              f" cannot generate {frames_after} (need at least one block of "
                              f"{block})")
        period = world.pano_width
        matches = []
        for i in range(s, s + n):
            given = (i // block) * block if teacher_forced else s  # frames the model got as truth
            seen, _ = last_seen(np.concatenate([ep.offsets[:given], ep.offsets[i:i + 1]]), given,
                                period=period)
            matches.append(seen)
        out.append(BenchEpisode(name=str(index), frames=ep.frames[:s + n], switch_frame=s,
                                num_generate=n,
                                prompt=ep.prompt, history_match=np.asarray(matches, dtype=np.int64),
                                camera_px=camera_track(ep.velocities)[:s + n]))
    return out


def _whole_blocks(frames: int, block: int) -> int:
    return (frames // block) * block


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[T, h, w, 3]`` -> ``[T, height, width, 3]`` (antialiased bilinear; identity if
    equal)."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, UINT8_LEVELS).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _parse_switch_entry(
    name: str, entry: Any, path: Path
) -> tuple[int, str, list[tuple[int, int]] | None]:
    """``int`` or ``{"switch_frame": int, "prompt": str, "pairs": [[generated, history], ...]}``."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry, "", None
    if not isinstance(entry, dict) or not isinstance(entry.get("switch_frame"), int):
        raise InputError(f"{path}: entry {name!r} must be a switch frame (int) or an object with "
                         "an int"
                         f" 'switch_frame', got {entry!r:.80}")
    prompt = entry.get("prompt", "")
    pairs = entry.get("pairs")
    if not isinstance(prompt, str):
        raise InputError(f"{path}: entry {name!r} has a non-string prompt")
    if pairs is not None:
        ok = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v,
                                                                   int) for v in p) for p in pairs)
        if not ok:
            raise InputError(f"{path}: entry {name!r} 'pairs' must be a list of [generated_frame,"
                             f" history_frame] int pairs, got {pairs!r:.80}")
        pairs = [(int(a), int(b)) for a, b in pairs]
    return entry["switch_frame"], prompt, pairs


def _inside(folder: Path, name: str, table_path: Path) -> Path:
    """``folder / name`` if that is a plain file name inside ``folder`` (no path, no ``..``, no link
    out)."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or not path.resolve().is_relative_to(
            folder.resolve()):
        raise InputError(f"{table_path} lists {name!r}: entries must be file names inside "
                         f"{folder}, not"
                         " paths")
    return path


def video_episodes(folder: str | Path, preset: Preset, *,
                   frames_after: int | None = None) -> list[BenchEpisode]:
    """Real videos as benchmark cases: ``folder/*.mp4`` plus ``folder/switch_times.json``.

    ``switch_times.json`` maps a file name to its switch frame (int), or to an object with
    ``switch_frame``, optional ``prompt`` and optional ``pairs`` ``[[generated, history], ...]``
    giving the history frame that shows the same view as a generated frame. Without pairs the mirror
    frame ``2s-1-i`` is used. Frames are resized to the preset's video size (the pixel codec's
    latent is the frame). The switch is rounded down to a whole block (the history is fed block by
    block).
    """

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--videos expects a folder of mp4 files and {SWITCH_TIMES_FILE}; "
                         f"{folder} is not"
                         " a folder")
    table_path = folder / SWITCH_TIMES_FILE
    if not table_path.is_file():
        raise InputError(f"{folder} has no {SWITCH_TIMES_FILE} (a JSON object: video file name -> "
                         "switch"
                         " frame)")
    try:
        table = json.loads(table_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{table_path} is not valid JSON ({err})") from err
    if not isinstance(table, dict) or not table:
        raise InputError(f"{table_path} must be a non-empty JSON object mapping video file names "
                         "to switch"
                         f" frames, got {type(table).__name__}")
    block = preset.cache.frames_per_block
    out = []
    for name in sorted(table):
        switch, prompt, pairs = _parse_switch_entry(name, table[name], table_path)
        video_path = _inside(folder, name, table_path)
        if not video_path.is_file():
            raise InputError(f"{table_path} lists {name!r}, which is not a file in {folder}")
        frames = resize_frames(read_mp4(video_path), preset.video.height, preset.video.width)
        total = frames.shape[0]
        s = _whole_blocks(switch, block)
        if switch >= total:
            raise InputError(f"{name} has {total} frames, shorter than its switch frame {switch}")
        if s < block:
            raise InputError(f"{name}: switch frame {switch} leaves less than one block ({block} "
                             "frames) of"
                             " history")
        n = _whole_blocks(min(frames_after, total - s) if frames_after is not None else total - s,
                          block)
        if n < block:
            raise InputError(f"{name} has {total - s} frames after its switch {s}; the benchmark "
                             "needs at"
                             f" least one block of {block}")
        indices = np.arange(s, s + n)
        if pairs is None:
            match = np.where(2 * s - 1 - indices >= 0, 2 * s - 1 - indices, -1)
        else:
            match = np.full(n, -1, dtype=np.int64)
            for generated, history in pairs:
                if not (s <= generated < s + n and 0 <= history < s):
                    raise InputError(f"{name}: pair [{generated}, {history}] must have a "
                                     "generated frame in"
                                     f" [{s}, {s + n}) and a history frame in [0, {s})")
                match[generated - s] = history
        out.append(BenchEpisode(name=Path(name).stem, frames=frames[:s + n], switch_frame=s,
                                num_generate=n,
                                prompt=prompt, history_match=match.astype(np.int64)))
    return out
