"""A -> B -> A loop trajectories: revisits far past a model's training horizon.

The camera sweeps region A, pans to region B about half a panorama away (no column in common with
A), sweeps B back and forth, pans back and sweeps A once more, ending on its first view. Positions
are whole steps of ``speed`` px from the start, so a view shown again is bit-identical. The return
falls at a fixed frame (the clip's last ``span + 1`` frames sweep A), so all episodes of a world
share their switch frame; the drawn dwell only moves the exit from A earlier or later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mag.errors import ConfigError, InputError
from mag.world.panorama import WorldConfig
from mag.world.trajectory import Trajectory

__all__ = ["LoopLayout", "loop_switch_frame", "loop_trajectory"]


@dataclass(frozen=True)
class LoopLayout:
    """Where the phases of one loop fall (frame indices) and its regions (in steps of the speed).

    Attributes:
        span_steps: region A is camera steps ``[0, span]``, region B ``[offset, offset + span]``.
        offset_steps: how far B's near edge is from A's start (about half a panorama).
        exit_frame: the last frame in A before the pan to B (at A's far edge, step ``span``).
        leave_frame: the last frame in B (at its near edge, step ``offset``); a full sweep of B
            ends there.
        return_frame: the first frame back in A (step ``span`` again).
    """

    span_steps: int
    offset_steps: int
    exit_frame: int
    leave_frame: int
    return_frame: int

    @property
    def dwell_frames(self) -> int:
        """Frames between the last look at A and the first one back: the gap of the return."""
        return self.return_frame - self.exit_frame

    @property
    def b_frames(self) -> range:
        """Frames showing region B (arrival at its near edge to ``leave_frame``)."""
        return range(self.exit_frame + self.offset_steps - self.span_steps, self.leave_frame + 1)


def _closed_walk(moves: int, span: int) -> list[int]:
    """``moves`` unit moves (+1, -1, or 0 for one pause) from a region's low edge back to it, never
    past ``span``: a partial sweep first, then full sweeps out and back."""
    full, rest = divmod(moves, 2 * span)
    half, pause = divmod(rest, 2)
    return [1] * half + [0] * pause + [-1] * half + ([1] * span + [-1] * span) * full


def loop_trajectory(rng: np.random.Generator, num_frames: int,
                    config: WorldConfig) -> tuple[Trajectory, LoopLayout]:
    """Draw an A -> B -> A loop of ``num_frames`` frames from ``rng``.

    Speed, start and direction are drawn as for a backtrack, then the dwell from
    ``config.dwell_frames_range``. ``turn_frame`` is the first frame of the pan back to A and
    ``excursion_frames`` the dwell.
    """
    if config.trajectory != "loop":
        raise ConfigError(f"loop_trajectory needs a world with trajectory='loop', got"
                          f" {config.trajectory!r}")
    speed = int(rng.choice(config.speed_choices_px))
    start = float(rng.integers(0, config.pano_width))
    direction = int(rng.choice((-1, 1)))
    dwell = int(rng.integers(config.dwell_frames_range[0], config.dwell_frames_range[1] + 1))
    span, offset = config.loop_steps(speed)
    pan = offset - span  # frames from A's far edge to B's near edge
    look = num_frames - 1 - 2 * span - dwell  # moves of the look at A before the final exit
    if look < 2 * span:
        raise InputError(f"a loop with a {dwell}-frame dwell needs at least {dwell + 4 * span + 1}"
                         f" frames, got {num_frames}")
    moves = (_closed_walk(look, span) + [1] * offset + _closed_walk(dwell - 2 * pan, span)
             + [-1] * offset)
    steps = np.concatenate([[0], np.cumsum(moves)]).astype(np.int64)
    exit_frame = look + span
    layout = LoopLayout(span_steps=span, offset_steps=offset, exit_frame=exit_frame,
                        leave_frame=exit_frame + dwell - pan, return_frame=exit_frame + dwell)
    offsets = np.mod(start + direction * speed * steps.astype(np.float64), config.pano_width)
    velocities = direction * speed * np.diff(steps, prepend=-1)  # frame 0: already moving
    path = Trajectory(offsets=offsets.astype(np.float32), velocities=velocities.astype(np.float32),
                      turn_frame=layout.leave_frame + 1, speed_px=float(speed),
                      direction=direction, excursion_frames=dwell, pause_frames=0)
    return path, layout


def loop_switch_frame(layout: LoopLayout, block_frames: int) -> int:
    """The last block boundary at least one sweep of B (``2 span`` frames) before B is left.

    The generated frames then hold a sweep of B (views last seen 2..2 span frames before), the pan
    back and the return to A (views last seen about a dwell before); every one of them shows a view
    of the history.
    """
    return block_frames * ((layout.leave_frame - 2 * layout.span_steps) // block_frames)
