"""Benchmark metrics for generated frames: PSNR, SSIM, LPIPS v0.1 (AlexNet), Fréchet AlexNet
distance.

The metric functions live in ``mag.bench.metrics`` (``from mag.bench.metrics import lpips, psnr,
...``); ``mag.bench.lpips`` is the LPIPS network module, so the ``lpips`` function is not
re-exported here. The consistency benchmark (``mag bench consistency``) lives in
``mag.bench.consistency``.
"""

from mag.bench.consistency import (
    BenchEpisode,
    ConsistencyConfig,
    ConsistencyResult,
    run_consistency,
)
from mag.bench.metrics import (
    PsnrSummary,
    frechet_alexnet_distance,
    frechet_distance,
    psnr,
    ssim,
    summarize_psnr,
)

__all__ = [
    "BenchEpisode",
    "ConsistencyConfig",
    "ConsistencyResult",
    "PsnrSummary",
    "frechet_alexnet_distance",
    "frechet_distance",
    "psnr",
    "run_consistency",
    "ssim",
    "summarize_psnr",
]
