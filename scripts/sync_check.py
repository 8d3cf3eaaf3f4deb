"""Stream a few blocks of every cache policy and fail on any host sync -- on the real device.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` makes every implicit sync (``.item()``,
``nonzero``, a blocking host-to-device copy, ...) raise; on ``meta`` (no GPU)
:class:`mag.bench.host.HostSyncAudit` stands in, as in tests/test_host.py. Random weights of
``--preset`` with ``--layers`` transformer layers (syncs do not depend on depth), batch 1, the first
block unchecked (handles and workspaces are created there).

Usage: python scripts/sync_check.py --device cuda [--preset wan-1.3b] [--layers 2] [--json-out F]
Exit status 1 when a policy synced; the JSON names the first sync per policy.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from mag.bench.host import HostSyncAudit
from mag.bench.speed import random_model, speed_preset
from mag.checkpoint import git_commit
from mag.config import replace_nested
from mag.io.files import write_json
from mag.pipelines import AVAILABLE_POLICIES, StreamingGenerator, policy_from_name, writer_for


@contextlib.contextmanager
def syncs_raise(device: torch.device) -> Iterator[None]:
    """Every host sync inside raises (CUDA's own check on a GPU, the audit elsewhere)."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with HostSyncAudit(strict=True):
            yield


def check(preset_name: str, layers: int, device: torch.device, dtype: torch.dtype,
          blocks: int) -> dict:
    preset = speed_preset(preset_name)
    preset = replace_nested(preset, {"dit.num_layers": layers})
    generator = random_model(preset, device, dtype, seed=0)
    memory_model = random_model(preset, device, dtype, seed=1)
    context = torch.zeros(1, preset.text_max_tokens, preset.dit.text_dim, device=device)
    block = preset.cache.frames_per_block
    offsets = torch.zeros(1, block, device=device) if preset.dit.camera_rope else None
    results = {}
    for name in AVAILABLE_POLICIES:
        policy = policy_from_name(name, preset)
        writer = writer_for(policy, memory_model=memory_model, empty_context=context)
        gen = StreamingGenerator.for_preset(generator, preset, policy, writer=writer)
        gen.reset(1, (blocks + 1) * block)
        gen.set_prompt(context)
        gen.generate_block(width_offsets=offsets)  # first block: cuBLAS / cuDNN handles, workspaces
        try:
            with syncs_raise(device):
                for _ in range(blocks):
                    gen.generate_block(width_offsets=offsets)
            results[name] = "no host sync"
        except Exception as err:  # the first sync, whatever raised it
            results[name] = f"SYNC: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return {"preset": preset.name, "layers": layers, "device": str(device), "dtype": str(dtype),
            "blocks_checked": blocks, "commit": git_commit(), "policies": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="wan-1.3b")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2: "
                                                              "syncs do not"
                                                                " depend on depth)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "meta")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--blocks", type=int, default=4, help="checked blocks per policy (rings "
                                                              "wrap)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    report = check(args.preset, args.layers, torch.device(args.device), dtype, args.blocks)
    for name, result in report["policies"].items():
        print(f"{name:>10}: {result}")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json_out, report, allow_nan=True)
    return 0 if all(r == "no host sync" for r in report["policies"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
