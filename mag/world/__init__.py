"""The panorama world: seeded cylindrical panoramas, backtracking cameras, episodes and clips.

Exact ground truth for the tiny scale: every frame is a window of a known panorama at a known
offset, so the benchmark can tell which history frame shows the same view (:func:`last_seen`).
"""

from mag.world.episodes import (
    NUM_TEST_EPISODES,
    SPLIT_SEEDS,
    Clip,
    Episode,
    episode_seed,
    make_clip,
    make_episode,
    make_prompt,
    sample_clip,
    theme_prompts,
)
from mag.world.loop import LoopLayout, loop_switch_frame, loop_trajectory
from mag.world.panorama import (
    DEFAULT_WORLD,
    THEMES,
    WORLD_PRESETS,
    Theme,
    WorldConfig,
    get_world_config,
    make_panorama,
    render_frames,
)
from mag.world.trajectory import (
    SAME_VIEW_TOLERANCE_PX,
    Trajectory,
    backtracking_trajectory,
    camera_track,
    last_seen,
    last_seen_all,
    switch_frame_for,
)

__all__ = [
    "DEFAULT_WORLD", "NUM_TEST_EPISODES", "SAME_VIEW_TOLERANCE_PX", "SPLIT_SEEDS", "THEMES",
    "WORLD_PRESETS",
    "Clip", "Episode", "LoopLayout", "Theme", "Trajectory", "WorldConfig",
    "backtracking_trajectory", "camera_track", "episode_seed",
    "get_world_config", "last_seen", "last_seen_all", "loop_switch_frame", "loop_trajectory",
    "make_clip", "make_episode", "make_panorama",
    "make_prompt", "render_frames", "sample_clip", "switch_frame_for", "theme_prompts",
]
