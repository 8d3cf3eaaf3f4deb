"""Per-block cost of the archive cache alone (no model): retrieval, rotated reads, eviction.

Streams 10,002 frames of random K/V through an ``ArchiveCache`` of the tiny preset at 16x16 (no
camera: retrieval by content, the costlier path) and prints the median milliseconds per block
near frame 200, 5,000 and 10,000. Usage: ``python scripts/archive_overhead.py``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mag.cache import ArchiveCache, ArchivePolicy
from mag.config import get_preset

BLOCKS = 3334  # 10,002 frames
SAMPLES = 20  # blocks per median
MS_PER_S = 1000.0


def main() -> None:
    torch.set_num_threads(1)
    preset = get_preset("tiny", **{"video.height": 16, "video.width": 16})
    cache_cfg, block = preset.cache, preset.cache.frames_per_block
    policy = ArchivePolicy(cache_cfg.memory_sink_frames, cache_cfg.archive_ring_slots,
                           cache_cfg.archive_retrieval_slots)
    tokens = preset.tokens_per_frame
    cache = ArchiveCache.for_config(preset.dit, policy, tokens_per_frame=tokens,
                                    view_width=preset.video.width // preset.dit.patch_size[2],
                                    frames_per_block=block)
    kv = torch.randn(1, preset.dit.num_heads, block * tokens, preset.dit.head_dim)
    seconds = []
    for b in range(BLOCKS):
        start = time.perf_counter()
        cache.prepare_block(b * block, None)
        for layer in range(preset.dit.num_layers):
            cache.read(layer)
        pending = cache.begin_write(block)
        for layer in range(preset.dit.num_layers):
            cache.write(layer, kv, kv, pending)
        cache.commit(pending, torch.arange(block))
        seconds.append(time.perf_counter() - start)
    ms = np.array(seconds) * MS_PER_S
    for frame in (200, 5000, 10000):
        at = min(frame // block, BLOCKS - SAMPLES)
        print(f"frame {frame}: {np.median(ms[at:at + SAMPLES]):.3f} ms per block")
    print(f"archive: {len(cache.archive)} frames, {cache.archive.nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
