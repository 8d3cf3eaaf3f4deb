"""Backtracking camera trajectories (MAG-Bench style) and view-revisit bookkeeping.

The camera pans away at a constant speed for an *excursion*, may pause, then pans back at the same
speed past its starting point, so the views of the excursion are shown again in reverse order. Each
offset is computed as ``start + direction * speed * n`` from an integer step count ``n``, so a view
revisited at the same ``n`` has a bit-identical offset (and therefore a bit-identical frame), even
with sub-pixel speeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mag.errors import InputError
from mag.world.panorama import WorldConfig

__all__ = ["SAME_VIEW_TOLERANCE_PX", "Trajectory", "backtracking_trajectory", "camera_track",
           "last_seen", "last_seen_all", "switch_frame_for"]

# Two offsets closer than this (px, around the cylinder) show the same view.
SAME_VIEW_TOLERANCE_PX = 1e-3


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Camera path of one clip.

    Attributes:
        offsets: float32 ``[T]`` left edge of the camera window in panorama columns, in [0, W_pano).
        velocities: float32 ``[T]`` signed px/frame; ``velocities[t]`` moved the camera from frame
            ``t-1`` to frame ``t`` (frame 0 carries the initial motion), usable as an action signal.
        turn_frame: first frame already moved back towards the start (-1 if the clip ends before).
        speed_px: camera speed in px/frame.
        direction: +1 (pans right, offsets grow) or -1 on the way out.
        excursion_frames / pause_frames: frames panning away / standing still at the turn.
    """

    offsets: np.ndarray
    velocities: np.ndarray
    turn_frame: int
    speed_px: float
    direction: int
    excursion_frames: int
    pause_frames: int


def backtracking_trajectory(rng: np.random.Generator, num_frames: int,
                            config: WorldConfig) -> Trajectory:
    """Draw a pan-away / pause / pan-back path of ``num_frames`` frames from ``rng``.

    Speed, direction, start, excursion and pause are drawn from ``config``. For clips too short for
    the drawn excursion to come back (training clips), the excursion is shortened so that the camera
    turns back at least one block before the clip ends whenever the clip allows it.
    """
    if num_frames <= 0:
        raise InputError(f"num_frames must be positive, got {num_frames}")
    if config.integer_motion:
        speed = float(rng.choice(config.speed_choices_px))
        start = float(rng.integers(0, config.pano_width))
    else:
        speed = float(rng.uniform(*config.speed_range_px))
        start = float(rng.uniform(0, config.pano_width))
    direction = int(rng.choice((-1, 1)))
    excursion = int(rng.integers(config.excursion_frames_range[0],
                                 config.excursion_frames_range[1] + 1))
    pause = int(rng.integers(config.pause_frames_range[0], config.pause_frames_range[1] + 1))
    # Shorten only when needed: turn + one visible block must fit in the clip.
    room = (num_frames - pause - config.block_frames) // 2
    excursion = max(1, min(excursion, room))

    frame = np.arange(num_frames)
    turn = excursion + pause + 1
    steps = np.where(frame <= excursion, frame, excursion)
    steps = np.where(frame >= turn, excursion - (frame - excursion - pause), steps)
    legs = int(rng.integers(config.legs_range[0], config.legs_range[1] + 1))
    if legs > 2:  # drawn after the two-leg path, so benchmark episodes are unchanged
        steps = _oscillating_steps(rng, num_frames, excursion, pause, legs, config)
    offsets = np.mod(start + direction * speed * steps.astype(np.float64), config.pano_width)
    moves = np.diff(steps, prepend=-1)  # frame 0: already moving outwards
    velocities = direction * speed * moves
    return Trajectory(
        offsets=offsets.astype(np.float32),
        velocities=velocities.astype(np.float32),
        turn_frame=turn if turn < num_frames else -1,
        speed_px=speed,
        direction=direction,
        excursion_frames=excursion,
        pause_frames=pause,
    )


def _oscillating_steps(rng: np.random.Generator, num_frames: int, first_leg: int, first_pause: int,
                       legs: int, config: WorldConfig) -> np.ndarray:
    """Step counts (in units of the speed) of a path with ``legs`` straight pans of alternating
    direction.

    Leg 1 and its pause are the backtrack's; legs 2..legs-1 draw their length from the excursion
    range and a pause; the last leg runs to the end of the clip.
    """
    moves = [1] * first_leg + [0] * first_pause
    direction = -1
    for _ in range(legs - 2):
        length = int(rng.integers(config.excursion_frames_range[0],
                                  config.excursion_frames_range[1] + 1))
        pause = int(rng.integers(config.pause_frames_range[0], config.pause_frames_range[1] + 1))
        moves += [direction] * length + [0] * pause
        direction = -direction
    moves += [direction] * max(0, num_frames - 1 - len(moves))
    return np.concatenate([[0], np.cumsum(moves[: num_frames - 1])]).astype(np.int64)


def camera_track(velocities: np.ndarray) -> np.ndarray:
    """Unwrapped horizontal camera position (px) of every frame relative to frame 0: ``[T]``
    float32.

    ``offsets`` wrap around the cylinder; this track does not, so equal values mean the same view
    (within one turn of the panorama). It is what camera-anchored RoPE uses as width positions.
    """
    return np.concatenate([[0.0], np.cumsum(velocities[1:], dtype=np.float64)]).astype(np.float32)


def switch_frame_for(turn_frame: int, block_frames: int) -> int:
    """MAG-Bench switch time: the first block boundary at least one block after the turn.

    Frames before it are history; the block ``[turn, turn + block)`` of backward motion lies inside
    it, so the direction the camera is going is visible to the model.
    """
    if turn_frame < 0:
        raise InputError("the camera never turns back in this clip; it has no switch time")
    return block_frames * math.ceil((turn_frame + block_frames) / block_frames)


def _view_distance(offsets: np.ndarray, offset: float, period: float | None) -> np.ndarray:
    diff = np.abs(offsets.astype(np.float64) - float(offset))
    return diff if period is None else np.minimum(diff % period, period - diff % period)


def last_seen(offsets: np.ndarray, t: int, *, period: float | None = None,
              tolerance: float = SAME_VIEW_TOLERANCE_PX) -> tuple[int, int]:
    """Most recent frame before ``t`` showing the same view as frame ``t``, and the gap in frames.

    Args:
        offsets: ``[T]`` camera offsets.
        t: frame index in ``[0, T)``.
        period: panorama width, so offsets compare around the cylinder (None: plain distance).
        tolerance: offsets closer than this (px) count as the same view.

    Returns:
        ``(index, t - index)``, or ``(-1, -1)`` when no earlier frame shows that view.
    """
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or not 0 <= t < len(offsets):
        raise InputError(f"need 1-D offsets and 0 <= t < {len(offsets)},"
                         f" got shape {list(offsets.shape)}, t={t}")
    same = np.flatnonzero(_view_distance(offsets[:t], offsets[t], period) <= tolerance)
    if same.size == 0:
        return -1, -1
    index = int(same[-1])
    return index, t - index


def last_seen_all(offsets: np.ndarray, *, period: float | None = None,
                  tolerance: float = SAME_VIEW_TOLERANCE_PX) -> tuple[np.ndarray, np.ndarray]:
    """:func:`last_seen` for every frame: int64 ``[T]`` indices and ``[T]`` gaps (-1 where
    unseen)."""
    offsets = np.asarray(offsets)
    pairs = [last_seen(offsets, t, period=period, tolerance=tolerance) for t in range(len(offsets))]
    result = np.asarray(pairs, dtype=np.int64).reshape(len(offsets), 2)
    return result[:, 0], result[:, 1]
