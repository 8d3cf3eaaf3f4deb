"""Benchmark episodes and training clips of the panorama world, reproducible from a seed.

Seeds: split ``s`` owns the seed range :data:`SPLIT_SEEDS` ``[s]`` (disjoint ranges), and episode
``index`` of a split uses seed ``range.start + index`` -- or ``seed_base + index`` when an explicit
base is given. One seed fixes the theme, prompt adjectives, panorama and trajectory through
independent child seeds. The MAG-Bench-style test set is the first :data:`NUM_TEST_EPISODES` test
episodes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mag.errors import ConfigError, InputError
from mag.world.loop import LoopLayout, loop_switch_frame, loop_trajectory
from mag.world.panorama import (
    DEFAULT_WORLD,
    THEMES,
    Theme,
    WorldConfig,
    make_panorama,
    render_frames,
)
from mag.world.trajectory import (
    backtracking_trajectory,
    last_seen_all,
    switch_frame_for,
)

__all__ = ["NUM_TEST_EPISODES", "SPLIT_SEEDS", "Clip", "Episode", "episode_seed", "make_clip",
           "make_episode", "make_prompt", "sample_clip", "theme_prompts"]

# Disjoint seed ranges. Training draws from a billion panoramas; val and test are fixed, small sets.
SPLIT_SEEDS: dict[str, range] = {
    "train": range(0, 1_000_000_000),
    "val": range(1_000_000_000, 1_000_100_000),
    "test": range(2_000_000_000, 2_000_100_000),
}
# Episodes in the benchmark's test set (MAG-Bench has 176).
NUM_TEST_EPISODES = 176
# The prompt uses one or two of the theme's adjectives.
MAX_PROMPT_ADJECTIVES = 2


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields explicitly, not with ==
class Clip:
    """A rendered camera path through one panorama.

    Attributes:
        frames: uint8 ``[T, H, W, 3]``.
        offsets: float32 ``[T]`` camera left edge in panorama columns, in [0, W_pano).
        velocities: float32 ``[T]`` signed px/frame that moved the camera onto each frame.
        prompt: text description of the theme (never of the layout).
        theme: theme name (a key of ``THEMES``).
        seed: the world seed everything was drawn from.
        turn_frame: first frame moving back towards the start (-1 if the clip ends before).
        panorama: uint8 ``[H, W_pano, 3]``, the ground-truth world.
        loop: where the phases of a loop trajectory fall (None for backtracks).
    """

    frames: np.ndarray
    offsets: np.ndarray
    velocities: np.ndarray
    prompt: str
    theme: str
    seed: int
    turn_frame: int
    panorama: np.ndarray
    loop: LoopLayout | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def last_seen(self) -> tuple[np.ndarray, np.ndarray]:
        """For every frame, the latest earlier frame with the same view and the gap (-1 if none)."""
        return last_seen_all(self.offsets, period=self.panorama.shape[1])


@dataclass(frozen=True, eq=False, kw_only=True)
class Episode(Clip):
    """A benchmark episode: a backtracking or loop clip with a split, an index and a switch time.

    Attributes:
        split: ``train``, ``val`` or ``test``. index: position in the split. switch_frame: frames
        ``[0, switch_frame)`` are history; a multiple of the block size, at least
            one block after ``turn_frame`` (loops: one sweep of B before B is left).
    """

    split: str
    index: int
    switch_frame: int


def episode_seed(split: str, index: int, seed_base: int | None = None) -> int:
    """The world seed of episode ``index`` of ``split`` (``seed_base + index`` when a base is
    given)."""
    if split not in SPLIT_SEEDS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_SEEDS)}")
    if not isinstance(index, int | np.integer) or index < 0:
        raise ConfigError(f"episode index must be an int >= 0, got {index!r}")
    if seed_base is not None:
        if seed_base < 0:
            raise ConfigError(f"seed_base must be >= 0, got {seed_base}")
        return int(seed_base) + int(index)
    seeds = SPLIT_SEEDS[split]
    if index >= len(seeds):
        raise ConfigError(f"split {split!r} has {len(seeds)} episodes; index {index} is out of "
                          "range")
    return seeds[int(index)]


def make_prompt(rng: np.random.Generator, theme: Theme) -> str:
    """A text description of the theme with one or two seeded adjectives (no layout information)."""
    count = int(rng.integers(1, MAX_PROMPT_ADJECTIVES + 1))
    chosen = sorted(rng.choice(len(theme.adjectives), size=count, replace=False))
    return _prompt_text([theme.adjectives[i] for i in chosen], theme)


def theme_prompts(theme: Theme) -> list[str]:
    """Every prompt :func:`make_prompt` can write for ``theme`` (adjectives in theme order)."""
    return [_prompt_text([theme.adjectives[i] for i in chosen], theme)
            for count in range(1, MAX_PROMPT_ADJECTIVES + 1)
            for chosen in itertools.combinations(range(len(theme.adjectives)), count)]


def _prompt_text(words: list[str], theme: Theme) -> str:
    return f"a camera panning slowly across a {', '.join(words)} {theme.scene}"


def make_clip(seed: int, num_frames: int, config: WorldConfig = DEFAULT_WORLD) -> Clip:
    """Render the clip of world ``seed``: ``num_frames`` frames of ``config`` size, on the path
    ``config.trajectory`` names."""
    theme_seq, pano_seq, traj_seq = np.random.SeedSequence(int(seed)).spawn(3)
    theme_rng = np.random.default_rng(theme_seq)
    theme = THEMES[config.theme_names[int(theme_rng.integers(len(config.theme_names)))]]
    prompt = make_prompt(theme_rng, theme)
    panorama = make_panorama(pano_seq, theme, config)
    traj_rng = np.random.default_rng(traj_seq)
    loop: LoopLayout | None = None
    if config.trajectory == "loop":
        path, loop = loop_trajectory(traj_rng, num_frames, config)
    else:
        path = backtracking_trajectory(traj_rng, num_frames, config)
    frames = render_frames(panorama, path.offsets, frame_width=config.frame_width,
                           frame_height=config.frame_height)
    return Clip(frames=frames, offsets=path.offsets, velocities=path.velocities, prompt=prompt,
                theme=theme.name, seed=int(seed), turn_frame=path.turn_frame, panorama=panorama,
                loop=loop)


def make_episode(split: str, index: int, *, seed_base: int | None = None,
                 config: WorldConfig = DEFAULT_WORLD) -> Episode:
    """Episode ``index`` of ``split``: ``config.episode_frames`` frames with a switch time.

    Reproducible from ``(split, index)``, or from ``(seed_base, index)`` when a base is given. For
    backtracks a longer ``episode_frames`` only extends the return leg: the first frames stay the
    same; a loop's return moves with the episode's end (:mod:`mag.world.loop`).
    """
    seed = episode_seed(split, index, seed_base)
    clip = make_clip(seed, config.episode_frames, config)
    if clip.loop is not None:
        switch = loop_switch_frame(clip.loop, config.block_frames)
    else:
        switch = switch_frame_for(clip.turn_frame, config.block_frames)
    if switch >= config.episode_frames:
        raise ConfigError(f"episode {split}/{index}: switch frame {switch} is past the end"
                          f" ({config.episode_frames} frames); raise episode_frames")
    return Episode(**{name: getattr(clip, name) for name in Clip.__dataclass_fields__},
                   split=split, index=int(index), switch_frame=switch)


def sample_clip(rng_or_seed: np.random.Generator | int, num_frames: int,
                config: WorldConfig = DEFAULT_WORLD) -> Clip:
    """One training clip from a random train-split world (infinite procedural data).

    Args:
        rng_or_seed: generator (advanced by one draw) or an int seed for a fresh one. num_frames:
        clip length; excursions longer than the clip allows are shortened so that the
            camera still turns back (short clips + short ``excursion_frames_range`` = curriculum
            start).
        config: world knobs; see :class:`WorldConfig` for the ones that make recall learnable.
    """
    if num_frames <= 0:
        raise InputError(f"num_frames must be positive, got {num_frames}")
    rng = rng_or_seed if isinstance(rng_or_seed,
                                    np.random.Generator) else np.random.default_rng(rng_or_seed)
    seeds = SPLIT_SEEDS["train"]
    return make_clip(int(rng.integers(seeds.start, seeds.stop)), num_frames, config)
