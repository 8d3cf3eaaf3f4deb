"""Eager kernel launches and host syncs per streamed block, counted on the ``meta`` device (no GPU
needed).

At Wan scale the eager block step is thousands of small kernels; this says how many, of which kinds,
per policy, so launch overhead can be weighed against a GPU run's fixed per-block cost
(docs/performance.md). Random weights, built on ``meta`` (no memory), in ``--dtype``; fused
attention counts as one kernel.

Usage: python scripts/count_kernels.py [--preset wan-1.3b] [--policies window,mag] [--json-out F]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mag.app import machine_info
from mag.bench.host import count_block_kernels
from mag.bench.speed import random_model, speed_preset
from mag.checkpoint import git_commit
from mag.io.files import write_json
from mag.pipelines import StreamingGenerator, check_policy_name, policy_from_name, writer_for

META = torch.device("meta")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def count(preset_name: str, policies: list[str], dtype: torch.dtype, warmup_blocks: int) -> dict:
    preset = speed_preset(preset_name)
    generator = random_model(preset, META, dtype, seed=0)
    memory_model = random_model(preset, META, dtype, seed=1)
    context = torch.zeros(1, preset.text_max_tokens, preset.dit.text_dim, device=META)
    offsets = torch.zeros(1, preset.cache.frames_per_block,
                          device=META) if preset.dit.camera_rope else None
    rows = {}
    for name in policies:
        policy = policy_from_name(check_policy_name(name), preset)
        writer = writer_for(policy, memory_model=memory_model, empty_context=context)
        gen = StreamingGenerator.for_preset(generator, preset, policy, writer=writer)
        gen.reset(1, (warmup_blocks + 1) * preset.cache.frames_per_block)
        rows[name] = count_block_kernels(gen, context, warmup_blocks=warmup_blocks,
                                         width_offsets=offsets)
    return {"preset": preset.name, "dtype": str(dtype).removeprefix("torch."),
            "warmup_blocks": warmup_blocks,
            "commit": git_commit(), "machine": machine_info("meta"), "policies": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="wan-1.3b")
    parser.add_argument("--policies", default="full,window,mag,bounded")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup-blocks", type=int, default=4, help="blocks streamed before the "
                                                                     "counted one")
    parser.add_argument("--json-out", type=Path, help="write the counts here as JSON")
    args = parser.parse_args()
    report = count(args.preset, args.policies.split(","), DTYPES[args.dtype], args.warmup_blocks)
    for name, row in report["policies"].items():
        per_layer = row["kernels_per_layer_forward"]
        print(f"{name:>10}: {row['kernels']:>6} kernels per block ({per_layer:.1f} per layer and "
              "forward,"
              f" {row['forwards']} forwards), {row['dtype_casts']} dtype casts,"
              f" {len(row['host_syncs'])} host syncs")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json_out, report, allow_nan=True)


if __name__ == "__main__":
    main()
