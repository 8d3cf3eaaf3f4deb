"""Cylindrical panoramas of the procedural world and the camera that looks at them.

A panorama is a uint8 RGB image ``[H, W_pano, 3]`` that wraps around horizontally (column ``W_pano``
is column 0 again): a background gradient with a wavy horizon, large flat shapes, stripes and a
little texture, all in the colours of a *theme*. A frame is a camera window ``[h, w, 3]`` whose left
edge sits at a (possibly fractional) horizontal offset. Everything is numpy and a pure function of
the seed, so ground truth is exact: the same offset always renders the same pixels.

:class:`WorldConfig` is the one configuration of the world (panorama, camera and trajectory knobs);
the knobs that make recall learnable for a tiny model are documented on it and in ``docs/world.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mag.errors import ConfigError, InputError
from mag.world.themes import THEMES, Theme

__all__ = ["DEFAULT_WORLD", "THEMES", "TRAJECTORIES", "Theme", "WORLD_PRESETS", "WorldConfig",
           "get_world_config", "make_panorama", "render_frames"]

# Background: a slow horizontal brightness wave of 1..this many whole periods around the cylinder
# (so no seam), and a horizon whose height wobbles by this share of the panorama height.
BACKGROUND_WAVE_MAX_PERIODS = 3
HORIZON_WOBBLE_FRACTION = 0.08
# Stripe patches: how many, their width as a share of the panorama width, and the stripe period
# (px).
STRIPE_PATCHES_RANGE = (1, 2)
STRIPE_PATCH_WIDTH_FRACTION = (0.12, 0.25)
STRIPE_PERIODS_PX = (4, 6, 8)
SHAPE_KINDS = ("rectangle", "ellipse", "triangle")
# Camera paths: the benchmark's pan-away-and-back (and its multi-leg training variant), or a loop
# from a region A to a disjoint region B half a panorama away and back (mag.world.loop).
TrajectoryKind = Literal["backtrack", "loop"]
TRAJECTORIES: tuple[TrajectoryKind, ...] = ("backtrack", "loop")
# Full sweeps across region B a loop makes before it leaves B: one for the history, one generated.
LOOP_MIN_B_SWEEPS = 2


@dataclass(frozen=True)
class WorldConfig:
    """Panorama, camera and trajectory knobs of the procedural world (lengths in px, times in
    frames).

    Knobs that make recall learnable for a tiny model (see ``docs/world.md``): ``integer_motion``
    with ``speed_quantum_px`` equal to the patch size (patch-aligned motion: an old view reappears
    as the same tokens), large ``shape_size_range``, small ``colors_per_panorama``,
    ``texture_scale=0`` and ``stripes=False`` (flat regions, nothing to memorise but the layout),
    and short ``excursion_frames_range`` first (a curriculum), long ones later.

    Attributes:
        pano_height / pano_width: panorama size; the panorama wraps around horizontally.
        frame_height / frame_width: camera window; it is centred vertically in the panorama.
        num_shapes_range: inclusive range of the number of flat shapes per panorama.
        shape_size_range: inclusive range of a shape's width and height in px. themes: theme names
        an episode draws from (empty = all of :data:`THEMES`). colors_per_panorama: palette colours
        one panorama uses for its shapes. stripes: draw the theme's stripe patches. texture_scale:
        multiplies the theme's per-pixel noise (0 = perfectly flat colours). background_wave_levels:
        amplitude (uint8 levels) of the slow horizontal brightness wave of the
            background; it tells far-apart background views apart, 0 makes the sky a flat gradient.
        speed_range_px: inclusive range of the camera speed in px/frame. speed_quantum_px: with
        integer motion, speeds are multiples of this (4 = patch-aligned for 4x4
            patches).
        integer_motion: whole-pixel offsets (frames are exact shifted slices); False draws sub-pixel
            speeds and start offsets, rendered by linear interpolation.
        excursion_frames_range: inclusive range of the frames the camera pans away before turning.
        pause_frames_range: inclusive range of the frames it stands still at the turn. legs_range:
        inclusive range of the number of legs (straight pans between turns). 2 is the
            benchmark's backtrack (out, then back past the start); more legs oscillate, each later
            leg revisiting what the previous one showed, so training clips hold far more revisits.
        episode_frames: length of a benchmark episode. block_frames: frames per generation block;
        the switch time is a multiple of it.
        trajectory: ``"backtrack"`` (the above) or ``"loop"``: look around region A, pan to region B
            half a panorama away (no column in common), sweep B, pan back to A (mag.world.loop).
        dwell_frames_range: loops only: inclusive range of the frames between the last look at A
            before leaving and the first one back (the gap of the first frame back in A).
    """

    pano_height: int = 32
    pano_width: int = 256
    frame_height: int = 32
    frame_width: int = 32
    num_shapes_range: tuple[int, int] = (6, 10)
    shape_size_range: tuple[int, int] = (8, 24)
    themes: tuple[str, ...] = ()
    colors_per_panorama: int = 4
    stripes: bool = True
    texture_scale: float = 1.0
    background_wave_levels: float = 10.0
    speed_range_px: tuple[float, float] = (1.0, 4.0)
    speed_quantum_px: int = 1
    integer_motion: bool = True
    excursion_frames_range: tuple[int, int] = (12, 36)
    pause_frames_range: tuple[int, int] = (0, 6)
    legs_range: tuple[int, int] = (2, 2)
    episode_frames: int = 96
    block_frames: int = 3
    trajectory: TrajectoryKind = "backtrack"
    dwell_frames_range: tuple[int, int] = (96, 96)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def theme_names(self) -> tuple[str, ...]:
        """Themes this world draws from, in a fixed order."""
        return self.themes or tuple(THEMES)

    @property
    def speed_choices_px(self) -> tuple[int, ...]:
        """With integer motion: the speeds (px/frame) a trajectory draws from."""
        lo, hi = self.speed_range_px
        q = self.speed_quantum_px
        return tuple(range(q * math.ceil(lo / q), int(math.floor(hi)) + 1, q))

    def loop_steps(self, speed: int) -> tuple[int, int]:
        """Loop regions at ``speed`` px/frame, in steps of ``speed`` px: ``(span, offset)``.

        Region A is camera steps ``[0, span]``, region B ``[offset, offset + span]``, about half a
        panorama away; the columns either region shows are disjoint around the cylinder. ``span`` is
        below 1 when the camera is too wide for two such regions.
        """
        half = self.pano_width // 2
        offset = -(-half // speed)  # ceil: B starts at least half a panorama after A
        room = min(half, self.pano_width - offset * speed) - self.frame_width
        return room // speed, offset

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in ("pano_height", "pano_width", "frame_height", "frame_width",
                     "colors_per_panorama", "speed_quantum_px", "episode_frames", "block_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"WorldConfig.{name} must be a positive int, got {value!r}")
        if self.frame_height > self.pano_height or self.frame_width >= self.pano_width:
            raise ConfigError(
                f"camera window {self.frame_height}x{self.frame_width} must fit in the panorama"
                f" {self.pano_height}x{self.pano_width} (height <= panorama height, width < "
                "panorama width)"
            )
        for name, minimum in (("num_shapes_range", 0), ("shape_size_range", 1), ("speed_range_px",
                                                                                 0),
                              ("excursion_frames_range", 1), ("pause_frames_range", 0),
                              ("legs_range", 2)):
            _check_range(self, name, minimum)
        if self.speed_range_px[0] <= 0:
            raise ConfigError(f"WorldConfig.speed_range_px must be > 0, got {self.speed_range_px}")
        if self.integer_motion and not self.speed_choices_px:
            raise ConfigError(
                f"WorldConfig.speed_range_px={self.speed_range_px} contains no multiple of"
                f" speed_quantum_px={self.speed_quantum_px}; widen the range or lower the quantum"
            )
        for name in ("texture_scale", "background_wave_levels"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        unknown = [name for name in self.themes if name not in THEMES]
        if unknown:
            raise ConfigError(f"unknown theme(s) {unknown}; valid themes: {', '.join(THEMES)}")
        smallest_palette = min(len(THEMES[name].palette) for name in self.theme_names)
        if self.colors_per_panorama > smallest_palette:
            raise ConfigError(
                f"WorldConfig.colors_per_panorama={self.colors_per_panorama} exceeds the smallest "
                "theme"
                f" palette ({smallest_palette} colours)"
            )
        if self.trajectory not in TRAJECTORIES:
            raise ConfigError(f"WorldConfig.trajectory must be one of {', '.join(TRAJECTORIES)},"
                              f" got {self.trajectory!r}")
        if self.trajectory == "loop":
            self._validate_loop()
            return
        # The camera must come back to where it started, and a switch block must fit after the turn.
        needed = (
            2 * self.excursion_frames_range[1] + self.pause_frames_range[1] + 2 * self.block_frames
        )
        if self.episode_frames < needed:
            raise ConfigError(
                f"WorldConfig.episode_frames={self.episode_frames} is too short: the longest "
                "excursion"
                f" and its return need 2*excursion + pause + 2*block = {needed} frames"
            )

    def _validate_loop(self) -> None:
        """Both regions fit at every speed, B is swept twice, and A is looked at before leaving."""
        _check_range(self, "dwell_frames_range", 1)
        if not self.integer_motion:
            raise ConfigError("WorldConfig.trajectory='loop' needs integer_motion=True (exact "
                              "revisits)")
        for speed in self.speed_choices_px:
            span, offset = self.loop_steps(speed)
            if span < 1:
                raise ConfigError(f"a loop at {speed} px/frame needs two disjoint regions: panorama"
                                  f" width {self.pano_width} must exceed 2 x (frame width"
                                  f" {self.frame_width} + {speed} px)")
            shortest = 2 * (offset - span) + 2 * LOOP_MIN_B_SWEEPS * span
            if self.dwell_frames_range[0] < shortest:
                raise ConfigError(f"WorldConfig.dwell_frames_range={self.dwell_frames_range} is too"
                                  f" short at {speed} px/frame: the pans and two sweeps of B take"
                                  f" {shortest} frames")
            needed = self.dwell_frames_range[1] + 4 * span + 1
            if self.episode_frames < needed:
                raise ConfigError(f"WorldConfig.episode_frames={self.episode_frames} is too short"
                                  f" for a loop at {speed} px/frame: a sweep of A, the longest"
                                  f" dwell and the return need {needed} frames")

    def replace(self, **changes: Any) -> WorldConfig:
        """A validated copy with some fields changed (lists become tuples)."""
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(f"WorldConfig has no field(s) {unknown};"
                              f" valid fields: {', '.join(sorted(valid))}")
        return dataclasses.replace(self, **changes)


def _check_range(cfg: WorldConfig, name: str, minimum: float) -> None:
    value = getattr(cfg, name)
    if not (isinstance(value, tuple) and len(value) == 2 and minimum <= value[0] <= value[1]):
        raise ConfigError(f"WorldConfig.{name} must be a (low, high) pair with {minimum} <= low "
                          "<= high,"
                          f" got {value!r}")


# The benchmark's world (a module-level singleton so functions can default to it).
DEFAULT_WORLD = WorldConfig()
# Named worlds: the benchmark default, and easier ones for a recall curriculum (short excursions
# first).
WORLD_PRESETS: dict[str, WorldConfig] = {
    "default": DEFAULT_WORLD,
    "recall-easy": WorldConfig(
        num_shapes_range=(5, 8), shape_size_range=(12, 28), colors_per_panorama=3, stripes=False,
        texture_scale=0.0, speed_range_px=(4, 4), speed_quantum_px=4, excursion_frames_range=(3,
                                                                                              12),
        pause_frames_range=(0, 3), episode_frames=48,
    ),
    "recall-long": WorldConfig(
        num_shapes_range=(5, 8), shape_size_range=(12, 28), colors_per_panorama=3, stripes=False,
        texture_scale=0.0, speed_range_px=(4, 4), speed_quantum_px=4, excursion_frames_range=(12,
                                                                                              36),
        pause_frames_range=(0, 6),
    ),
    # The tiny recipes' look (128 px panorama, 4 px/frame) on A -> B -> A loops: 600-frame episodes
    # whose returns to A come 97..500 frames after A was last seen (with 16 px frames).
    "loop-600": WorldConfig(
        pano_height=16, pano_width=128, frame_height=16, frame_width=16, shape_size_range=(4, 12),
        stripes=False, texture_scale=0.3, speed_range_px=(4, 4), speed_quantum_px=4,
        trajectory="loop", dwell_frames_range=(103, 476), episode_frames=600,
    ),
}


def get_world_config(name: str = "default", **overrides: Any) -> WorldConfig:
    """A named world from :data:`WORLD_PRESETS`, optionally with fields replaced."""
    if name not in WORLD_PRESETS:
        raise ConfigError(f"unknown world {name!r}; valid worlds: {', '.join(WORLD_PRESETS)}")
    return WORLD_PRESETS[name].replace(**overrides) if overrides else WORLD_PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Panorama


def make_panorama(seed: int | np.random.SeedSequence, theme: Theme,
                  config: WorldConfig) -> np.ndarray:
    """Draw one panorama: uint8 ``[pano_height, pano_width, 3]``, wrapping horizontally.

    Background, stripes, shapes and texture use independent child seeds, so switching stripes or
    texture off keeps the same shapes in the same places.
    """
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    bg_rng, stripe_rng, shape_rng, texture_rng = (np.random.default_rng(s) for s in seq.spawn(4))
    h, w = config.pano_height, config.pano_width
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]

    image = _background(bg_rng, theme, config.background_wave_levels, ys, xs, h, w)
    if config.stripes and theme.stripes != "none":
        _draw_stripes(stripe_rng, image, theme, ys, xs, h, w)
    _draw_shapes(shape_rng, image, theme, config, ys, xs, h, w)
    if config.texture_scale > 0 and theme.texture_levels > 0:
        noise = texture_rng.normal(0.0, theme.texture_levels * config.texture_scale, size=(h, w, 1))
        image += noise.astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, theme: Theme, wave_levels: float, ys: np.ndarray,
                xs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Vertical gradient, a seamless brightness wave, and a wavy ground band: float32 [h, w, 3]."""
    t = ys[..., None] / max(h - 1, 1)
    top, bottom = np.asarray(theme.sky_top, np.float32), np.asarray(theme.sky_bottom, np.float32)
    image = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.float32)
    periods = rng.integers(1, BACKGROUND_WAVE_MAX_PERIODS + 1)
    wave = wave_levels * np.sin(2 * np.pi * periods * xs / w + rng.uniform(0, 2 * np.pi))
    image += wave[..., None]
    if theme.ground_fraction > 0:
        periods = rng.integers(1, BACKGROUND_WAVE_MAX_PERIODS + 1)
        phase = rng.uniform(0, 2 * np.pi)
        wobble = HORIZON_WOBBLE_FRACTION * h * np.sin(2 * np.pi * periods * xs / w + phase)
        horizon = h * (1 - theme.ground_fraction) + wobble
        image[np.broadcast_to(ys >= horizon, (h, w))] = theme.ground
    return image


def _circular_dx(xs: np.ndarray, center: float, w: int) -> np.ndarray:
    """Signed horizontal distance from ``center`` on the cylinder, in [-w/2, w/2)."""
    return (xs - center + w / 2) % w - w / 2


def _draw_stripes(rng: np.random.Generator, image: np.ndarray, theme: Theme, ys: np.ndarray,
                  xs: np.ndarray, h: int, w: int) -> None:
    """Patches of stripes (fences, windows, strata) in the theme's stripe colour, in place."""
    for _ in range(rng.integers(STRIPE_PATCHES_RANGE[0], STRIPE_PATCHES_RANGE[1] + 1)):
        width = rng.uniform(*STRIPE_PATCH_WIDTH_FRACTION) * w
        center = rng.uniform(0, w)
        top = rng.uniform(0, h / 2)
        bottom = rng.uniform(top + h / 4, h)
        period = int(rng.choice(STRIPE_PERIODS_PX))
        dx = _circular_dx(xs, center, w)
        inside = (np.abs(dx) <= width / 2) & (ys >= top) & (ys < bottom)
        coord = dx + width / 2 if theme.stripes == "vertical" else ys - top
        on = np.floor(coord) % period < period / 2
        image[np.broadcast_to(inside & on, (h, w))] = theme.stripe_color


def _draw_shapes(rng: np.random.Generator, image: np.ndarray, theme: Theme, config: WorldConfig,
                 ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> None:
    """Large flat rectangles, ellipses and triangles from a few palette colours, in place."""
    colors = rng.choice(len(theme.palette), size=config.colors_per_panorama, replace=False)
    weights = np.asarray(theme.shape_weights, np.float64)
    lo, hi = config.num_shapes_range
    for _ in range(rng.integers(lo, hi + 1)):
        kind = SHAPE_KINDS[rng.choice(len(SHAPE_KINDS), p=weights / weights.sum())]
        size_w, size_h = rng.integers(config.shape_size_range[0], config.shape_size_range[1] + 1,
                                      size=2)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        color = theme.palette[colors[rng.integers(len(colors))]]
        dx, dy = _circular_dx(xs, cx, w), ys - cy
        if kind == "rectangle":
            mask = (np.abs(dx) <= size_w / 2) & (np.abs(dy) <= size_h / 2)
        elif kind == "ellipse":
            mask = (dx / (size_w / 2)) ** 2 + (dy / (size_h / 2)) ** 2 <= 1
        else:  # upright triangle: apex on top, base at the bottom
            depth = (dy + size_h / 2) / size_h
            mask = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * size_w / 2)
        image[np.broadcast_to(mask, (h, w))] = color


# ---------------------------------------------------------------------------------------------
# Camera


def render_frames(panorama: np.ndarray, offsets: np.ndarray, *, frame_width: int = 32,
                  frame_height: int | None = None) -> np.ndarray:
    """Camera windows of a panorama at horizontal offsets: uint8 ``[T, frame_height, frame_width,
    3]``.

    Args:
        panorama: uint8 ``[H, W_pano, 3]``, wrapping horizontally.
        offsets: ``[T]`` left edge of each window in panorama columns (any real value; taken modulo
            ``W_pano``). Whole-pixel offsets are exact slices; fractional ones interpolate linearly
            between the two neighbouring columns, so the same offset always gives the same frame.
        frame_width / frame_height: window size; the height defaults to the panorama's, and a
            shorter window is centred vertically.
    """
    if panorama.dtype != np.uint8 or panorama.ndim != 3 or panorama.shape[2] != 3:
        raise InputError(f"panorama must be uint8 [H, W, 3], got {panorama.dtype} "
                         f"{list(panorama.shape)}")
    pano_h, pano_w, _ = panorama.shape
    frame_height = pano_h if frame_height is None else frame_height
    if not (0 < frame_height <= pano_h and 0 < frame_width <= pano_w):
        raise InputError(f"camera window {frame_height}x{frame_width} does not fit in the panorama"
                         f" {pano_h}x{pano_w}")
    offsets = np.asarray(offsets, dtype=np.float64)
    if offsets.ndim != 1 or not np.all(np.isfinite(offsets)):
        raise InputError(f"offsets must be a finite 1-D array, got shape {list(offsets.shape)}")
    top = (pano_h - frame_height) // 2
    # Column-major copy so that one gather of window columns yields contiguous [w, h, 3] blocks.
    columns = np.ascontiguousarray(panorama[top:top + frame_height].transpose(1, 0, 2))
    base = np.floor(offsets)
    frac = (offsets - base).astype(np.float32)
    index = (base.astype(np.int64)[:, None] + np.arange(frame_width)) % pano_w  # [T, w]
    left = columns[index]  # [T, w, h, 3]
    if np.any(frac):
        right = columns[(index + 1) % pano_w].astype(np.float32)
        mixed = left + frac[:, None, None, None] * (right - left)
        left = np.rint(mixed).astype(np.uint8)
    return np.ascontiguousarray(left.transpose(0, 2, 1, 3))
