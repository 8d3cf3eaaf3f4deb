"""Benchmark metrics for generated frames: PSNR, SSIM, LPIPS v0.1 (AlexNet), Fréchet AlexNet distance.

The metric functions live in ``mag.bench.metrics`` (``from mag.bench.metrics import lpips, psnr, ...``);
``mag.bench.lpips`` is the LPIPS network module, so the ``lpips`` function is not re-exported here.
"""

from mag.bench.metrics import (
    PsnrSummary,
    frechet_alexnet_distance,
    frechet_distance,
    psnr,
    ssim,
    summarize_psnr,
)

__all__ = [
    "PsnrSummary",
    "frechet_alexnet_distance",
    "frechet_distance",
    "psnr",
    "ssim",
    "summarize_psnr",
]
