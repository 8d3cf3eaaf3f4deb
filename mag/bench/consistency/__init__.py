"""The MAG-Bench-style consistency benchmark (``mag bench consistency``).

``episodes`` (world and real-video episodes), ``scores`` (per-frame metrics and their means),
``run`` (every policy streams the same episodes), ``report`` and ``plots`` (files) make the
frame-aligned protocol; ``magbench`` is MAG-Bench's own (LPIPS-nearest matching). Method and
figures: docs/benchmark.md.
"""

from mag.bench.consistency.episodes import (
    BenchEpisode,
    bench_world,
    video_episodes,
    within_window,
    world_episodes,
)
from mag.bench.consistency.magbench import (
    MagBenchClip,
    magbench_clips,
    run_magbench,
    write_magbench_results,
)
from mag.bench.consistency.report import write_results
from mag.bench.consistency.run import build_policies, run_consistency, stream_episodes
from mag.bench.consistency.scores import (
    GAP_BIN_EDGES,
    METRICS,
    PSNR_CAP_DB,
    REFERENCE_ROWS,
    REVISIT_GAP_RANGES,
    ConsistencyConfig,
    ConsistencyResult,
    RowScores,
    episode_summary,
    gap_bin_labels,
    revisit_summary,
    score_episode,
    score_pairs,
    summarize_row,
)

__all__ = ["GAP_BIN_EDGES", "METRICS", "PSNR_CAP_DB", "REFERENCE_ROWS", "REVISIT_GAP_RANGES",
           "BenchEpisode",
           "ConsistencyConfig",
           "ConsistencyResult", "MagBenchClip", "RowScores", "bench_world", "build_policies",
           "episode_summary", "gap_bin_labels", "magbench_clips", "revisit_summary",
           "run_consistency", "run_magbench",
           "score_episode", "score_pairs",
           "stream_episodes", "summarize_row", "video_episodes", "within_window", "world_episodes",
           "write_magbench_results", "write_results"]
