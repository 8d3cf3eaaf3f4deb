"""A -> B -> A loop trajectories: B never shows A's columns, the return's gaps are the dwell, the
named ``loop-600`` world, and one-line config errors."""

from __future__ import annotations

import numpy as np
import pytest

from mag.errors import ConfigError, InputError
from mag.world import (
    WorldConfig,
    get_world_config,
    last_seen_all,
    make_clip,
    make_episode,
)

# loop-600 at the tiny recipes' 16 px frames (what preset_world gives a 16 px model).
LOOP_16 = get_world_config("loop-600", frame_height=16, frame_width=16)
# A short loop for fast checks: a 96 px panorama, regions of 8 steps of 4 px.
SHORT = WorldConfig(pano_height=16, pano_width=96, frame_height=16, frame_width=16,
                    speed_range_px=(4, 4), speed_quantum_px=4, trajectory="loop",
                    dwell_frames_range=(40, 60), episode_frames=96)


def _columns(offsets: np.ndarray, frame_width: int, pano_width: int) -> set[int]:
    """Panorama columns the camera shows over ``offsets`` (whole-pixel motion)."""
    cols = (offsets.astype(np.int64)[:, None] + np.arange(frame_width)) % pano_width
    return set(cols.ravel().tolist())


@pytest.mark.parametrize("world", [LOOP_16, SHORT], ids=["loop-600", "short"])
def test_the_dwell_in_b_never_shows_a_and_the_camera_returns_to_a(world):
    directions = set()
    for index in range(6):
        ep = make_episode("test", index, config=world)
        loop = ep.loop
        directions.add(int(np.sign(ep.velocities[0])))
        a_cols = _columns(ep.offsets[:loop.exit_frame + 1], world.frame_width, world.pano_width)
        b = ep.offsets[loop.b_frames.start:loop.b_frames.stop]
        assert len(b) > 4 * loop.span_steps  # at least two sweeps of B
        assert not a_cols & _columns(b, world.frame_width, world.pano_width)
        # B is about half a panorama from A: its views sit half a turn from A's.
        assert loop.offset_steps * ep.velocities[0] % world.pano_width in (
            world.pano_width // 2, world.pano_width - world.pano_width // 2)
        back = ep.offsets[loop.return_frame:]
        assert _columns(back, world.frame_width, world.pano_width) <= a_cols
        assert ep.offsets[-1] == ep.offsets[0]  # the last frame is A's first view again
        assert np.array_equal(ep.frames[-1], ep.frames[0])
        # Frames move at most one step of the speed: no jump between regions.
        assert np.abs(np.diff(ep.offsets.astype(np.float64))).max() in (
            4.0, world.pano_width - 4.0)
    assert directions == {-1, 1}


@pytest.mark.parametrize("world", [LOOP_16, SHORT], ids=["loop-600", "short"])
def test_the_return_to_a_comes_a_dwell_after_a_was_last_seen(world):
    block = world.block_frames
    dwells, returns = [], set()
    for index in range(8):
        ep = make_episode("test", index, config=world)
        loop = ep.loop
        _, gaps = last_seen_all(ep.offsets, period=world.pano_width)
        dwell = loop.dwell_frames
        dwells.append(dwell)
        returns.add(loop.return_frame)
        assert world.dwell_frames_range[0] <= dwell <= world.dwell_frames_range[1]
        assert gaps[loop.return_frame] == dwell
        first_block = gaps[loop.return_frame:loop.return_frame + block]
        assert (np.abs(first_block - dwell) <= 2 * block).all()
        # The whole return sweep looks at views last seen dwell..dwell + 2 span frames before.
        assert (gaps[loop.return_frame:] >= dwell).all()
        assert (gaps[loop.return_frame:] <= dwell + 2 * loop.span_steps).all()
        # The switch sits one sweep of B before B is left; everything after it was seen before.
        s = ep.switch_frame
        assert s % block == 0 and s <= loop.leave_frame - 2 * loop.span_steps < s + block
        assert (gaps[s:] > 0).all()
        assert gaps[s:loop.leave_frame + 1].max() <= 2 * loop.span_steps
    assert len(set(dwells)) > 1  # drawn per episode
    assert len(returns) == 1  # a fixed return: every episode has the same switch frame


def test_loop_600_covers_gaps_97_to_500_with_16_px_frames():
    world = get_world_config("loop-600")
    assert (world.trajectory, world.episode_frames, world.pano_width) == ("loop", 600, 128)
    span, offset = LOOP_16.loop_steps(4)
    assert (span, offset) == (12, 16)
    low, high = world.dwell_frames_range
    # The pan back revisits the pan out (gaps from dwell - 2 (offset - span - 1)), and the return
    # sweep ends at dwell + 2 span.
    assert (low - 2 * (offset - span - 1), high + 2 * span) == (97, 500)
    assert get_world_config("default").trajectory == "backtrack"
    assert make_episode("test", 0).loop is None


def test_loops_are_reproducible_from_the_seed():
    a, b = make_episode("val", 3, config=SHORT), make_episode("val", 3, config=SHORT)
    assert a.frames.tobytes() == b.frames.tobytes() and a.loop == b.loop
    assert a.offsets.tobytes() != make_episode("val", 4, config=SHORT).offsets.tobytes()


@pytest.mark.parametrize("changes, message", [
    ({"trajectory": "spiral"}, "trajectory must be one of backtrack, loop"),
    ({"integer_motion": False}, "needs integer_motion"),
    ({"frame_width": 46}, "needs two disjoint regions"),
    ({"dwell_frames_range": (38, 40)}, "dwell_frames_range=.* too short"),
    ({"dwell_frames_range": (50, 45)}, "low <= high"),
    ({"episode_frames": 90}, "episode_frames=90 is too short for a loop"),
])
def test_loop_config_errors_are_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        SHORT.replace(**changes)
    assert "\n" not in str(err.value)


def test_a_clip_too_short_for_the_drawn_dwell_is_an_input_error():
    with pytest.raises(InputError, match="needs at least .* frames, got 30"):
        make_clip(0, 30, SHORT)
