"""MAG-Bench-style consistency benchmark: does a cache policy let the model redraw what it saw?

Protocol (DESIGN §3). For every episode, frames ``[0, s)`` (``s`` = switch frame) are history: they
are fed clean into the generator's KV cache under the policy under test (``StreamingGenerator.feed``).
The model then generates ``num_generate`` frames in whole blocks -- autoregressively from its own
output, or, with ``teacher_forced``, each block from the TRUE earlier frames (recall apart from drift).

Every generated frame ``i`` is scored (PSNR / SSIM / LPIPS on [0, 1] images, after quantising to
uint8 as a saved video would be):

- ``vs_gt``: against the true frame ``i``;
- ``vs_history``: against ``m(i)``, the latest history frame showing the same view (panorama world:
  same camera offset; real videos: the frame given in ``switch_times.json``, default the mirror frame
  ``2s-1-i``). Only *revisited* frames (``m(i) >= 0``) have this score.

Revisited frames are split by whether ``m(i)`` is **within** the window policy's attention when frame
``i``'s block is generated -- a sink frame, or one of the ``window_frames`` frames just before the block
-- or **beyond** it. The rule is the window policy's for every row (full, downsample, references), so
rows are comparable: ``beyond`` is exactly where a sliding window has forgotten the view. Revisited
frames are also binned by gap ``i - m(i)`` (:data:`GAP_BIN_EDGES`).

Aggregation: per episode and category, SSIM / LPIPS are the mean over its frames and PSNR is the PSNR
of the mean MSE over its frames (identical frames -- frequent in the world: pauses, the camera coming
round the cylinder -- then count as MSE 0 rather than as a capped dB value dominating a mean of dB);
then the mean over the episodes that have frames in that category. Per-frame PSNR, and a category whose
frames are all identical, is capped at :data:`PSNR_CAP_DB`.

Reference rows (policy-free): ``repeat-last`` repeats the last history frame for every generated frame;
``oracle-copy`` copies ``m(i)`` and is scored only on revisited frames (it has nothing to copy elsewhere).
In the panorama world revisits are exact, so oracle-copy scores the cap vs history and vs ground truth:
it bounds what memory can achieve.

Batching: episodes with the same ``(switch frame, generated frames)`` share one stream (cache shapes
and positions match), chunked to ``batch_size``. The 176 test episodes fall into about a dozen groups,
so a policy costs a dozen batched streams instead of 176 single ones. The noise of a chunk is seeded
from ``(seed, first episode)``, so every policy sees the same noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mag.bench.lpips import MIN_IMAGE_SIDE
from mag.bench.metrics import lpips, psnr, ssim
from mag.cache import CachePolicy
from mag.codecs import Codec, frames_to_tensor, get_codec_for, tensor_to_frames
from mag.config import CacheConfig, Preset
from mag.errors import ConfigError, InputError
from mag.memory import memory_model_mismatch
from mag.models.dit import WanDiT
from mag.pipelines.streaming import (
    CacheWriter,
    SamplerConfig,
    StreamingGenerator,
    check_policy_name,
    policy_from_name,
    writer_for,
)
from mag.schedulers import FlowMatchScheduler
from mag.train.data import preset_world
from mag.world import WorldConfig, camera_track, last_seen, make_episode

__all__ = ["GAP_BIN_EDGES", "METRICS", "PSNR_CAP_DB", "REFERENCE_ROWS", "BenchEpisode", "ConsistencyConfig",
           "ConsistencyResult", "RowScores", "bench_world", "build_policies", "check_memory_model",
           "episode_summary", "gap_bin_labels", "run_consistency", "score_episode", "stream_episodes",
           "summarize_row", "video_episodes", "within_window", "world_episodes"]

METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips")
TARGETS: tuple[str, ...] = ("vs_gt", "vs_history")
REFERENCE_ROWS: tuple[str, ...] = ("repeat-last", "oracle-copy")
# PSNR of identical frames (MSE 0) would be +inf; it counts as this many dB in every mean.
PSNR_CAP_DB = 100.0
# Gap bins (frames since the view was last seen in the history): (lo, hi], the last one open-ended.
GAP_BIN_EDGES: tuple[int, ...] = (0, 6, 12, 18, 24, 36, 48, 72, 96)
# Episodes streamed together at most (memory bound; the tiny model fits far more).
DEFAULT_BATCH_EPISODES = 32
SWITCH_TIMES_FILE = "switch_times.json"
UINT8_LEVELS = 255.0


# ---------------------------------------------------------------------------------------------
# Episodes


@dataclass(frozen=True, eq=False)
class BenchEpisode:
    """One benchmark case, already at the model's frame size.

    Attributes:
        name: file stem of its per-episode JSON (world: the episode index; videos: the file stem).
        frames: uint8 ``[T, H, W, 3]`` ground truth, ``T >= switch_frame + num_generate``.
        switch_frame: frames ``[0, switch_frame)`` are history (a multiple of the block size).
        num_generate: generated frames after the switch (whole blocks).
        prompt: text prompt of the stream.
        history_match: int64 ``[num_generate]``: history frame showing the same view, -1 where none.
        camera_px: float32 ``[T]`` unwrapped horizontal camera track (px, relative to frame 0), or None
            when unknown (real videos). Camera-anchored models (``dit.camera_rope``) need it.
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
        """Frames since each generated frame's view was last seen in the history (-1: never)."""
        return np.where(self.history_match >= 0, self.frame_indices - self.history_match, -1)


def within_window(frame_index: np.ndarray, seen_index: np.ndarray, cache: CacheConfig) -> np.ndarray:
    """Whether the window policy still attends to history frame ``seen_index`` when frame ``frame_index``
    is generated: a sink frame, or one of the ``window_frames`` frames before the frame's block."""
    block_start = (frame_index // cache.frames_per_block) * cache.frames_per_block
    return (seen_index >= 0) & ((seen_index < cache.sink_frames)
                                | (seen_index >= block_start - cache.window_frames))


def bench_world(preset: Preset, *, name: str | None = None, training_world: dict[str, Any] | None = None,
                excursion_scale: float = 1.0, frames_after: int | None = None,
                episode_frames: int | None = None) -> tuple[WorldConfig, str]:
    """The benchmark's world at the model's frame size, and where it came from.

    ``name`` (``--world``) wins; else the training world of the checkpoint (``recipe.data.world``, so
    the benchmark matches the training distribution); else ``default``. Either way the frames take the
    preset's video size (panorama as high as the frame unless the world says otherwise, as in
    training), trajectories are the benchmark's 2-leg backtracks, excursions are scaled by
    ``excursion_scale``, and episodes are long enough for the return leg and ``frames_after``.
    ``episode_frames`` fixes the episode length instead (it must still fit the return leg).
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
    low, high = world.excursion_frames_range
    excursion = (max(1, round(low * excursion_scale)), max(1, round(high * excursion_scale)))
    pause = world.pause_frames_range[1]
    # Longest path to the switch: excursion + pause + 1 (turn) + up to two blocks (switch_frame_for).
    latest_switch = excursion[1] + pause + 1 + 2 * block
    needed = max(2 * excursion[1] + pause + 2 * block, latest_switch + (frames_after or 0))
    if episode_frames is not None and episode_frames < needed:
        raise ConfigError(f"--episode-frames {episode_frames} is too short: this world's longest excursion,"
                          f" its return and the switch need {needed} frames")
    world = world.replace(legs_range=(2, 2), excursion_frames_range=excursion,
                          episode_frames=episode_frames or max(world.episode_frames, needed))
    return world, source


def world_episodes(world: WorldConfig, *, split: str = "test", count: int, seed_base: int | None = None,
                   frames_after: int | None = None, start: int = 0) -> list[BenchEpisode]:
    """Panorama-world episodes ``start .. start+count-1`` of ``split`` as benchmark cases."""
    if count <= 0:
        raise ConfigError(f"the benchmark needs at least one episode, got {count}")
    block = world.block_frames
    out = []
    for index in range(start, start + count):
        ep = make_episode(split, index, seed_base=seed_base, config=world)
        s, total = ep.switch_frame, ep.num_frames
        n = _whole_blocks(frames_after if frames_after is not None else total - s, block)
        if n < block or s + n > total:
            raise ConfigError(f"episode {split}/{index} has {total - s} frames after its switch at {s};"
                              f" cannot generate {frames_after} (need at least one block of {block})")
        period = world.pano_width
        matches = []
        for i in range(s, s + n):
            seen, _ = last_seen(np.concatenate([ep.offsets[:s], ep.offsets[i:i + 1]]), s, period=period)
            matches.append(seen)
        out.append(BenchEpisode(name=str(index), frames=ep.frames[:s + n], switch_frame=s, num_generate=n,
                                prompt=ep.prompt, history_match=np.asarray(matches, dtype=np.int64),
                                camera_px=camera_track(ep.velocities)[:s + n]))
    return out


def _whole_blocks(frames: int, block: int) -> int:
    return (frames // block) * block


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[T, h, w, 3]`` -> ``[T, height, width, 3]`` (antialiased bilinear; identity if equal)."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, UINT8_LEVELS).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _parse_switch_entry(name: str, entry: Any, path: Path) -> tuple[int, str, list[tuple[int, int]] | None]:
    """``int`` or ``{"switch_frame": int, "prompt": str, "pairs": [[generated, history], ...]}``."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry, "", None
    if not isinstance(entry, dict) or not isinstance(entry.get("switch_frame"), int):
        raise InputError(f"{path}: entry {name!r} must be a switch frame (int) or an object with an int"
                         f" 'switch_frame', got {entry!r:.80}")
    prompt = entry.get("prompt", "")
    pairs = entry.get("pairs")
    if not isinstance(prompt, str):
        raise InputError(f"{path}: entry {name!r} has a non-string prompt")
    if pairs is not None:
        ok = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs)
        if not ok:
            raise InputError(f"{path}: entry {name!r} 'pairs' must be a list of [generated_frame,"
                             f" history_frame] int pairs, got {pairs!r:.80}")
        pairs = [(int(a), int(b)) for a, b in pairs]
    return entry["switch_frame"], prompt, pairs


def video_episodes(folder: str | Path, preset: Preset, *,
                   frames_after: int | None = None) -> list[BenchEpisode]:
    """Real videos as benchmark cases: ``folder/*.mp4`` plus ``folder/switch_times.json``.

    ``switch_times.json`` maps a file name to its switch frame (int), or to an object with
    ``switch_frame``, optional ``prompt`` and optional ``pairs`` ``[[generated, history], ...]`` giving the
    history frame that shows the same view as a generated frame. Without pairs the mirror frame
    ``2s-1-i`` is used. Frames are resized to the preset's video size (the pixel codec's latent is the
    frame). The switch is rounded down to a whole block (the history is fed block by block).
    """
    from mag.io.video import read_mp4

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--videos expects a folder of mp4 files and {SWITCH_TIMES_FILE}; {folder} is not"
                         " a folder")
    table_path = folder / SWITCH_TIMES_FILE
    if not table_path.is_file():
        raise InputError(f"{folder} has no {SWITCH_TIMES_FILE} (a JSON object: video file name -> switch"
                         " frame)")
    try:
        table = json.loads(table_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{table_path} is not valid JSON ({err})") from err
    if not isinstance(table, dict) or not table:
        raise InputError(f"{table_path} must be a non-empty JSON object mapping video file names to switch"
                         f" frames, got {type(table).__name__}")
    block = preset.cache.frames_per_block
    out = []
    for name in sorted(table):
        switch, prompt, pairs = _parse_switch_entry(name, table[name], table_path)
        video_path = folder / name
        if not video_path.is_file():
            raise InputError(f"{table_path} lists {name!r}, which is not a file in {folder}")
        frames = _resize_frames(read_mp4(video_path), preset.video.height, preset.video.width)
        total = frames.shape[0]
        s = _whole_blocks(switch, block)
        if switch >= total:
            raise InputError(f"{name} has {total} frames, shorter than its switch frame {switch}")
        if s < block:
            raise InputError(f"{name}: switch frame {switch} leaves less than one block ({block} frames) of"
                             " history")
        n = _whole_blocks(min(frames_after, total - s) if frames_after is not None else total - s, block)
        if n < block:
            raise InputError(f"{name} has {total - s} frames after its switch {s}; the benchmark needs at"
                             f" least one block of {block}")
        indices = np.arange(s, s + n)
        if pairs is None:
            match = np.where(2 * s - 1 - indices >= 0, 2 * s - 1 - indices, -1)
        else:
            match = np.full(n, -1, dtype=np.int64)
            for generated, history in pairs:
                if not (s <= generated < s + n and 0 <= history < s):
                    raise InputError(f"{name}: pair [{generated}, {history}] must have a generated frame in"
                                     f" [{s}, {s + n}) and a history frame in [0, {s})")
                match[generated - s] = history
        out.append(BenchEpisode(name=Path(name).stem, frames=frames[:s + n], switch_frame=s, num_generate=n,
                                prompt=prompt, history_match=match.astype(np.int64)))
    return out


# ---------------------------------------------------------------------------------------------
# Scores


@dataclass
class RowScores:
    """Per-frame scores of one row (a policy or a reference) on every episode.

    ``frames[episode][target][metric]`` is a float64 ``[num_generate]`` array, NaN where not scored.
    """

    name: str
    frames: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)


@dataclass
class ConsistencyResult:
    """Everything the runner measured: per-frame scores of every row, plus strip frames."""

    episodes: list[BenchEpisode]
    policies: dict[str, RowScores]
    references: dict[str, RowScores]
    within: list[np.ndarray]  # per episode, bool [num_generate]
    strip_episode: int
    strip_frames: dict[str, np.ndarray]  # row -> uint8 [num_generate, H, W, 3] of the strip episode


@dataclass(frozen=True)
class ConsistencyConfig:
    """Knobs of one benchmark run.

    Attributes:
        policies: cache policy names (see :func:`mag.pipelines.policy_from_name`).
        teacher_forced: predict each block from the true earlier frames instead of the model's own.
        sampler: how blocks are denoised.
        batch_size: episodes streamed together at most.
        seed: noise seed (the same noise for every policy).
        lpips: compute LPIPS (the slowest metric on CPU); off -> reported as null.
        empty_prompt_after_switch: generate with the EMPTY prompt after the switch (the history is fed
            with the real one), so what the model draws can come only from its memory -- the setting of
            MAG's history loss (DESIGN §1, "Generator (stage 2)").
    """

    policies: tuple[str, ...] = ("full", "window", "downsample")
    teacher_forced: bool = False
    sampler: SamplerConfig = SamplerConfig()
    batch_size: int = DEFAULT_BATCH_EPISODES
    seed: int = 0
    lpips: bool = True
    empty_prompt_after_switch: bool = False

    @property
    def mode(self) -> str:
        return "teacher-forced" if self.teacher_forced else "autoregressive"


def _to_unit(frames: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / UINT8_LEVELS


def _lpips_upsampled(a: Tensor, b: Tensor) -> Tensor:
    """LPIPS on frames upsampled (nearest, integer factor) to at least AlexNet's minimum side."""
    side = min(a.shape[-2:])
    factor = math.ceil(MIN_IMAGE_SIDE / side) if side < MIN_IMAGE_SIDE else 1
    if factor > 1:
        a = F.interpolate(a, scale_factor=factor, mode="nearest")
        b = F.interpolate(b, scale_factor=factor, mode="nearest")
    return lpips(a, b)


def score_pairs(pred: np.ndarray, target: np.ndarray, *, with_lpips: bool = True) -> dict[str, np.ndarray]:
    """PSNR (capped), SSIM and LPIPS of uint8 frame pairs ``[N, H, W, 3]`` -> float64 ``[N]`` each.

    Identical pairs skip LPIPS (it is exactly 0 there).
    """
    n = pred.shape[0]
    out = {m: np.full(n, np.nan) for m in METRICS}
    if n == 0:
        return out
    a, b = _to_unit(pred), _to_unit(target)
    out["psnr"] = psnr(a, b).double().clamp_max(PSNR_CAP_DB).numpy()
    out["ssim"] = ssim(a, b).double().numpy()
    if with_lpips:
        differ = np.flatnonzero((pred != target).reshape(n, -1).any(axis=1))
        values = np.zeros(n)
        if differ.size:
            index = torch.from_numpy(differ)
            values[differ] = _lpips_upsampled(a[index], b[index]).double().numpy()
        out["lpips"] = values
    return out


def score_episode(pred: np.ndarray, episode: BenchEpisode, *, with_lpips: bool,
                   only_revisited: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Scores of generated frames ``pred: [num_generate, H, W, 3]`` vs GT and vs the matched history."""
    n, s = episode.num_generate, episode.switch_frame
    revisited = np.flatnonzero(episode.history_match >= 0)
    scored = revisited if only_revisited else np.arange(n)
    result = {}
    for target, rows, targets in (
        ("vs_gt", scored, episode.frames[s + scored]),
        ("vs_history", revisited, episode.frames[episode.history_match[revisited]]),
    ):
        values = score_pairs(pred[rows], targets, with_lpips=with_lpips)
        full = {m: np.full(n, np.nan) for m in METRICS}
        for m in METRICS:
            full[m][rows] = values[m]
        result[target] = full
    return result


# ---------------------------------------------------------------------------------------------
# Runner


def _groups(episodes: Sequence[BenchEpisode], batch_size: int) -> list[list[int]]:
    """Episode indices sharing ``(switch_frame, num_generate)``, in chunks of at most ``batch_size``."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, ep in enumerate(episodes):
        by_shape.setdefault((ep.switch_frame, ep.num_generate), []).append(i)
    chunks = []
    for key in sorted(by_shape):
        members = by_shape[key]
        chunks.extend(members[j:j + batch_size] for j in range(0, len(members), batch_size))
    return chunks


def _choose_strip_episode(episodes: Sequence[BenchEpisode], within: Sequence[np.ndarray]) -> int:
    """The first episode with a beyond-window revisit, else the first with any revisit, else 0."""
    for i, ep in enumerate(episodes):
        if ((ep.history_match >= 0) & ~within[i]).any():
            return i
    for i, ep in enumerate(episodes):
        if (ep.history_match >= 0).any():
            return i
    return 0


def _check_codec(codec: Codec) -> None:
    if codec.temporal_compression != 1:
        raise ConfigError(
            f"the consistency benchmark matches generated and history frames one to one, which needs a"
            f" codec without temporal compression; codec {codec.name!r} compresses time"
            f" {codec.temporal_compression}x"
        )


def stream_episodes(gen: StreamingGenerator, codec: Codec, episodes: Sequence[BenchEpisode],
                    context: Tensor, teacher_forced: bool, noise: torch.Generator,
                    generation_context: Tensor | None = None, *,
                    on_block: Callable[[], None] | None = None) -> np.ndarray:
    """Feed the history of same-shape episodes and generate the rest; uint8 ``[B, n, H, W, 3]``.

    The benchmark's per-episode streaming loop, shared with ``mag demo``. ``context``: ``[B, L, text_dim]``
    prompt embeddings; ``generation_context`` (default ``context``): the prompt embeddings after the
    switch; ``noise`` seeds every block, so two policies given equal seeds see equal noise; ``on_block``
    is called after each generated block (a progress bar).
    """
    s, n = episodes[0].switch_frame, episodes[0].num_generate
    block = gen.frames_per_block
    video = torch.stack([frames_to_tensor(ep.frames[:s + n]) for ep in episodes])
    latents = codec.encode(video.to(gen.device))
    offsets = _width_offsets(gen.model, episodes, s + n)
    gen.reset(len(episodes), s + n)
    gen.set_prompt(context)
    gen.feed(latents[:, :s], None if offsets is None else offsets[:, :s])
    if generation_context is not None:
        gen.set_prompt(generation_context)
    blocks = []
    for start in range(s, s + n, block):
        frames = slice(start, start + block)
        block_offsets = None if offsets is None else offsets[:, frames]
        if teacher_forced:
            blocks.append(gen.predict_block_teacher_forced(latents[:, frames], noise, block_offsets))
        else:
            blocks.append(gen.generate_block(noise, block_offsets))
        if on_block is not None:
            on_block()
    decoded = codec.decode(torch.cat(blocks, 1))
    return np.stack([tensor_to_frames(v) for v in decoded])


def _width_offsets(model: WanDiT, episodes: Sequence[BenchEpisode], frames: int) -> Tensor | None:
    """Camera positions in patches ``[B, frames]`` for camera-anchored models, else None.

    The benchmark gives a camera-anchored model the ground-truth camera path (it is a camera-controlled
    world model); the frames themselves are still generated from memory alone.
    """
    if not model.cfg.camera_rope:
        return None
    if any(ep.camera_px is None for ep in episodes):
        raise ConfigError("this model is camera-anchored (dit.camera_rope) and needs a camera track per"
                          " episode; real-video folders have none")
    track = torch.from_numpy(np.stack([ep.camera_px[:frames] for ep in episodes]))
    return (track / model.cfg.patch_size[2]).to(model.patch_embedding.weight.device)


def check_memory_model(preset: Preset, memory_preset: Preset) -> None:
    """Refuse a memory model whose architecture, latent geometry, block size or text encoder differs from
    the generator's (:func:`mag.memory.memory_model_mismatch`)."""
    mismatch = memory_model_mismatch(preset, memory_preset)
    if mismatch is not None:
        raise ConfigError(
            f"the memory model (preset {memory_preset.name!r}) does not match the generator (preset"
            f" {preset.name!r}) in {mismatch}; a memory model writes into the generator's KV cache and"
            " must be trained on the generator's preset: pass the memory model of this generator")


def build_policies(names: Sequence[str], preset: Preset, *, memory_model: WanDiT | None = None,
                   empty_context: Tensor | None = None) -> dict[str, tuple[CachePolicy, CacheWriter | None]]:
    """Cache policies and their writers by name; ``mag`` / ``bounded`` are written by ``memory_model`` run
    with ``empty_context`` (``[1, L, text_dim]``, the empty prompt), which must then be given."""
    built = {}
    for name in names:
        policy = policy_from_name(check_policy_name(name, has_memory_model=memory_model is not None), preset)
        built[name] = (policy, writer_for(policy, memory_model=memory_model, empty_context=empty_context))
    return built


def run_consistency(model: WanDiT, preset: Preset, episodes: Sequence[BenchEpisode],
                    encode_prompts: Callable[[list[str]], Tensor], config: ConsistencyConfig, *,
                    progress: bool = True, memory_model: WanDiT | None = None,
                    empty_context: Tensor | None = None) -> ConsistencyResult:
    """Run every policy and the reference rows on ``episodes``; see the module docstring.

    Args:
        encode_prompts: prompts -> ``[B, L, text_dim]`` text embeddings (e.g. a PromptEmbeddingCache.get).
        memory_model: the stage-1 memory model that writes the cache under ``mag`` / ``bounded``
            (same preset as the generator, see :func:`check_memory_model`).
        empty_context: ``[1, L, text_dim]`` embeddings of the empty prompt that the memory model reads.
    """
    from tqdm.auto import tqdm

    if not episodes:
        raise ConfigError("the benchmark needs at least one episode")
    if config.batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {config.batch_size}")
    policies = build_policies(config.policies, preset, memory_model=memory_model, empty_context=empty_context)
    codec = get_codec_for(preset.video)
    _check_codec(codec)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    within = [within_window(ep.frame_indices, ep.history_match, preset.cache) for ep in episodes]
    strip = _choose_strip_episode(episodes, within)
    strip_frames: dict[str, np.ndarray] = {}

    references = {name: RowScores(name) for name in REFERENCE_ROWS}
    for i, ep in enumerate(episodes):
        s, n = ep.switch_frame, ep.num_generate
        repeat = np.repeat(ep.frames[s - 1:s], n, axis=0)
        oracle = ep.frames[np.maximum(ep.history_match, 0)]
        references["repeat-last"].frames.append(score_episode(repeat, ep, with_lpips=config.lpips))
        references["oracle-copy"].frames.append(
            score_episode(oracle, ep, with_lpips=config.lpips, only_revisited=True))
        if i == strip:
            # Frames without a history match have nothing to copy: shown black in the strip.
            strip_frames["repeat-last"] = repeat
            strip_frames["oracle-copy"] = np.where((ep.history_match >= 0)[:, None, None, None], oracle, 0)

    chunks = _groups(episodes, config.batch_size)
    rows: dict[str, RowScores] = {}
    for name, (policy, writer) in policies.items():
        gen = StreamingGenerator(model, scheduler, preset, policy, sampler=config.sampler, writer=writer)
        per_episode: list[dict[str, dict[str, np.ndarray]] | None] = [None] * len(episodes)
        bar = tqdm(total=len(episodes), desc=f"{name} ({config.mode})", unit="episode", disable=not progress)
        for chunk in chunks:
            members = [episodes[i] for i in chunk]
            noise = torch.Generator(device=gen.device).manual_seed(config.seed * 1_000_003 + chunk[0])
            context = encode_prompts([ep.prompt for ep in members]).to(gen.device)
            after = (encode_prompts([""] * len(members)).to(gen.device) if config.empty_prompt_after_switch
                     else None)
            frames = stream_episodes(gen, codec, members, context, config.teacher_forced, noise, after)
            for i, pred in zip(chunk, frames, strict=True):
                per_episode[i] = score_episode(pred, episodes[i], with_lpips=config.lpips)
                if i == strip:
                    strip_frames[name] = pred
            bar.update(len(chunk))
        bar.close()
        rows[name] = RowScores(name, [scores for scores in per_episode if scores is not None])
    return ConsistencyResult(list(episodes), rows, references, within, strip, strip_frames)


# ---------------------------------------------------------------------------------------------
# Aggregation


def gap_bin_labels() -> list[str]:
    """Labels of the gap bins: ``"1-6"``, ``"7-12"``, ..., ``">96"``."""
    edges = GAP_BIN_EDGES
    return [f"{lo + 1}-{hi}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [f">{edges[-1]}"]


def _gap_bin(gaps: np.ndarray) -> np.ndarray:
    """Bin index of each gap (-1 for never-seen frames)."""
    index = np.searchsorted(np.asarray(GAP_BIN_EDGES), gaps, side="left") - 1
    return np.where(gaps > 0, index, -1)


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    chosen = values[mask & ~np.isnan(values)]
    return float(chosen.mean()) if chosen.size else None


def _psnr_of_mean_mse(psnr_db: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR of the mean MSE of the chosen frames (frames on [0, 1], so MSE = 10^(-PSNR/10)).

    Averaging MSE, not dB, lets identical frames count as MSE 0 instead of a cap that would dominate a
    mean of dB values; the result is capped only when every chosen frame is identical.
    """
    chosen = psnr_db[mask & ~np.isnan(psnr_db)]
    if not chosen.size:
        return None
    mse = float(np.mean(10.0 ** (-chosen / 10.0)))
    return min(PSNR_CAP_DB, -10.0 * math.log10(mse)) if mse > 0 else PSNR_CAP_DB


def _category_means(scores: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    means: dict[str, Any] = {m: _mean(scores[m], mask) for m in METRICS}
    means["psnr"] = _psnr_of_mean_mse(scores["psnr"], mask)
    return {**means, "frames": int(mask.sum())}


def episode_summary(frame_scores: dict[str, dict[str, np.ndarray]], episode: BenchEpisode,
                    within: np.ndarray) -> dict[str, Any]:
    """Per-episode means: all scored frames, ``within``, ``beyond``, ``unseen`` (vs_gt) and gap bins."""
    revisited = episode.history_match >= 0
    bins = _gap_bin(episode.gaps)
    out: dict[str, Any] = {}
    for target in TARGETS:
        scores = frame_scores[target]
        scored = ~np.isnan(scores["psnr"]) & (revisited if target == "vs_history" else True)
        entry = _category_means(scores, scored)
        entry["within"] = _category_means(scores, scored & revisited & within)
        entry["beyond"] = _category_means(scores, scored & revisited & ~within)
        if target == "vs_gt":
            entry["unseen"] = _category_means(scores, scored & ~revisited)
        entry["by_gap"] = {label: _category_means(scores, scored & (bins == b))
                           for b, label in enumerate(gap_bin_labels())}
        out[target] = entry
    return out


def _mean_over_episodes(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of per-episode means, over the episodes that have the category (``episodes`` counts them)."""
    out: dict[str, Any] = {}
    for m in METRICS:
        values = [e[m] for e in entries if e[m] is not None]
        out[m] = float(np.mean(values)) if values else None
    out["episodes"] = sum(1 for e in entries if e["psnr"] is not None)
    out["frames"] = sum(e["frames"] for e in entries)
    return out


def summarize_row(row: RowScores, result: ConsistencyResult) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary over episodes, per-episode summaries)`` of one row (the contract's JSON shape)."""
    per_episode = [episode_summary(scores, ep, within)
                   for scores, ep, within in zip(row.frames, result.episodes, result.within, strict=True)]
    summary: dict[str, Any] = {}
    for target in TARGETS:
        entries = [e[target] for e in per_episode]
        entry = _mean_over_episodes(entries)
        categories = ("within", "beyond", "unseen") if target == "vs_gt" else ("within", "beyond")
        for category in categories:
            entry[category] = _mean_over_episodes([e[category] for e in entries])
        entry["by_gap"] = {label: _mean_over_episodes([e["by_gap"][label] for e in entries])
                           for label in gap_bin_labels()}
        summary[target] = entry
    return summary, per_episode


def episode_record(row: RowScores, index: int, result: ConsistencyResult,
                   summary: dict[str, Any]) -> dict[str, Any]:
    """The per-episode JSON: the episode, its per-frame scores and its means."""
    ep = result.episodes[index]
    scores = row.frames[index]

    def clean(values: np.ndarray) -> list[float | None]:
        return [None if math.isnan(v) else float(v) for v in values]

    return {
        "row": row.name,
        "episode": ep.name,
        "prompt": ep.prompt,
        "switch_frame": ep.switch_frame,
        "num_generated": ep.num_generate,
        "frames": ep.frame_indices.tolist(),
        "history_match": ep.history_match.tolist(),
        "gap": ep.gaps.tolist(),
        "within_window": result.within[index].tolist(),
        "scores": {target: {m: clean(scores[target][m]) for m in METRICS} for target in TARGETS},
        "summary": summary,
    }


def config_record(config: ConsistencyConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(config), "mode": config.mode}


# ---------------------------------------------------------------------------------------------
# Report files


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# Decimals shown in the markdown table per metric.
_TABLE_DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3}


def markdown_summary(summary: dict[str, Any]) -> str:
    """Two tables (vs ground truth, vs history): PSNR / SSIM / LPIPS over all, within and beyond frames."""
    rows = {**summary["policies"], **summary["references"]}
    lines = [f"# Consistency benchmark ({summary['mode']}, {summary['episodes']} episodes)", "",
             f"within/beyond: the window policy's attention (sink {summary['window']['sink_frames']} +"
             f" last {summary['window']['window_frames']} frames before the block). PSNR in dB, capped at"
             f" {PSNR_CAP_DB:g}; oracle-copy is scored on revisited frames only.", ""]
    for target, title in (("vs_gt", "vs ground truth"), ("vs_history", "vs history (same view)")):
        lines += [f"## {title}", "",
                  "| row | PSNR | SSIM | LPIPS | PSNR within | SSIM within | LPIPS within | PSNR beyond"
                  " | SSIM beyond | LPIPS beyond | episodes beyond |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            entry = row[target]
            cells = [_fmt(entry[m], _TABLE_DIGITS[m]) for m in METRICS]
            for category in ("within", "beyond"):
                cells += [_fmt(entry[category][m], _TABLE_DIGITS[m]) for m in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['beyond']['episodes']} |")
        lines.append("")
    return "\n".join(lines)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def write_results(out_dir: str | Path, result: ConsistencyResult, config: ConsistencyConfig, preset: Preset,
                  metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md``, ``episodes/<row>/<episode>.json``, ``metadata.json`` and the
    two plots into ``out_dir``; return the summary."""
    from mag.bench.plots import plot_psnr_vs_gap, write_revisit_strip

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out}: {err.strerror}") from err
    summary: dict[str, Any] = {
        "mode": config.mode,
        "episodes": len(result.episodes),
        "window": {"sink_frames": preset.cache.sink_frames, "window_frames": preset.cache.window_frames,
                   "frames_per_block": preset.cache.frames_per_block},
        "psnr_cap_db": PSNR_CAP_DB,
        "gap_bins": gap_bin_labels(),
        "policies": {},
        "references": {},
    }
    for group, rows in (("policies", result.policies), ("references", result.references)):
        for name, row in rows.items():
            row_summary, per_episode = summarize_row(row, result)
            summary[group][name] = row_summary
            for index, episode_entry in enumerate(per_episode):
                record = episode_record(row, index, result, episode_entry)
                _write_json(out / "episodes" / name / f"{result.episodes[index].name}.json", record)
    summary["config"] = config_record(config)
    summary["metadata"] = metadata
    _write_json(out / "summary.json", summary)
    _write_json(out / "metadata.json", metadata)
    (out / "summary.md").write_text(markdown_summary(summary))
    plot_psnr_vs_gap(summary, out / "psnr_vs_gap.png")
    write_revisit_strip(result, out / "revisit_strip.png")
    return summary
