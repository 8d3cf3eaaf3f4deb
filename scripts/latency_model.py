"""Fit per-block latency = a + c x (frames of keys the block attends to) over the policies of a
speed run.

The cached-frame count before each block follows from the policy's own write plans, replayed on the
host (:func:`mag.cache.retained_frames`, as for the benchmark's KV curve); the block's own frames
are added. One least-squares line over every block of every policy separates the cost that does not
depend on the cache (``a``: linear layers, norms, elementwise work, launches) from the cost per
frame of keys (``c``: attention over cached tokens), and says how far each policy's mean is from the
line.

Usage: python scripts/latency_model.py results/speed/gpu-h200/wan-1.3b-eager-prefix.json [--json-out
F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from mag.cache import CachePolicy, MagPolicy, retained_frames
from mag.config import CacheConfig, Preset, get_preset
from mag.io.files import write_json
from mag.pipelines import MEMORY_MODEL_POLICIES, policy_from_name


def plan_policy(name: str, preset: Preset) -> CachePolicy:
    """Policy ``name`` for replaying write plans: memory policies need no writer to plan."""
    cache = preset.cache
    if name in MEMORY_MODEL_POLICIES:
        return MagPolicy(cache.memory_sink_frames,
                         cache.memory_slots if name == "bounded" else None)
    return policy_from_name(name, preset)


def cached_frames(policy: CachePolicy, preset: Preset, blocks: int) -> list[int]:
    """Frames in the cache when each of ``blocks`` blocks is generated (the benchmark's plan
    replay)."""
    block = preset.cache.frames_per_block
    return retained_frames(policy, preset, [b * block for b in range(blocks)])


def fit(report: dict[str, Any]) -> dict[str, Any]:
    """The line and, per policy, mean measured and fitted latency, mean keys and the rms
    residual."""
    preset = get_preset(report["preset"], cache=CacheConfig(**report["cache"]))
    block = preset.cache.frames_per_block
    names, keys, ms = [], [], []
    for name, row in report["policies"].items():
        latencies = row["latency_ms_blocks"]
        cached = cached_frames(plan_policy(name, preset), preset, len(latencies))
        for frames, latency in zip(cached, latencies, strict=True):
            names.append(name)
            keys.append(frames + block)
            ms.append(latency)
    design = np.stack([np.ones(len(keys)), np.asarray(keys, dtype=float)], axis=1)
    measured = np.asarray(ms)
    (a, c), *_ = np.linalg.lstsq(design, measured, rcond=None)
    fitted = design @ np.array([a, c])
    policies = {}
    for name in report["policies"]:
        mine = np.array([n == name for n in names])
        policies[name] = {
            "mean_ms": float(measured[mine].mean()),
            "fit_ms": float(fitted[mine].mean()),
            "mean_key_frames": float(design[mine, 1].mean()),
            "rms_residual_ms": float(np.sqrt(((measured[mine] - fitted[mine]) ** 2).mean())),
        }
    return {"fixed_ms": float(a), "ms_per_key_frame": float(c), "blocks": len(ms),
            "policies": policies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--json-out", type=Path, default=None, help="write the fit as JSON")
    args = parser.parse_args()
    result = fit(json.loads(args.json.read_text()))
    print(f"latency = {result['fixed_ms']:.1f} ms + {result['ms_per_key_frame']:.2f} ms x frames "
          "of keys"
          f" ({result['blocks']} blocks)")
    for name, row in result["policies"].items():
        print(f"  {name:>10}: mean {row['mean_ms']:.1f} ms, fit {row['fit_ms']:.1f} ms, mean keys"
              f" {row['mean_key_frames']:.2f} frames, rms residual {row['rms_residual_ms']:.1f} ms")
    if args.json_out is not None:
        write_json(args.json_out, {"source": str(args.json), **result}, allow_nan=True)


if __name__ == "__main__":
    main()
