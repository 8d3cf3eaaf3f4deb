"""``mag bench speed``: frames/s, per-block latency, peak RSS or GPU bytes, KV size of a stream.

``setup`` (config, geometry, models), ``measure`` (timed streams), ``report`` (JSON, plot), ``cli``.
What is measured and how: docs/benchmark.md, "Speed benchmark".
"""

from mag.bench.speed.cli import add_speed_arguments, run_speed_cli
from mag.bench.speed.measure import merge_rounds, run_speed, stream_blocks
from mag.bench.speed.report import write_plot
from mag.bench.speed.setup import (
    KV_HORIZONS,
    SpeedConfig,
    SpeedModels,
    build_models,
    kv_bytes_curve,
    latent_frames_for,
    random_model,
    speed_preset,
    video_frames_for,
)

__all__ = ["KV_HORIZONS", "SpeedConfig", "SpeedModels", "add_speed_arguments", "build_models",
           "kv_bytes_curve", "latent_frames_for", "merge_rounds", "random_model", "run_speed",
           "run_speed_cli", "speed_preset", "stream_blocks", "video_frames_for", "write_plot"]
