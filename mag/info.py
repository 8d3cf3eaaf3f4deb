"""``mag info``: the size of a preset's model without allocating it (built on the meta device)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from mag.cache import kv_bytes_per_frame
from mag.config import Preset, get_preset
from mag.models import WanDiT, count_parameters

KV_DTYPE = torch.bfloat16


def preset_info(preset: Preset) -> dict[str, Any]:
    """Exact parameter count, token geometry and KV-cache bytes per latent frame of ``preset``."""
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    dit = preset.dit
    tokens = preset.tokens_per_frame
    return {
        "preset": preset.name,
        "params": count_parameters(model),
        "tokens_per_frame": tokens,
        "latent_frame_shape": [dit.in_channels, preset.video.latent_height,
                               preset.video.latent_width],
        "num_layers": dit.num_layers,
        "dim": dit.dim,
        "num_heads": dit.num_heads,
        "head_dim": dit.head_dim,
        "ffn_dim": dit.ffn_dim,
        "text_dim": dit.text_dim,
        "frames_per_block": preset.cache.frames_per_block,
        # K and V, every layer, every token of one latent frame, batch 1.
        "kv_bytes_per_frame_bf16": kv_bytes_per_frame(dit, tokens, KV_DTYPE),
    }


def run(args: argparse.Namespace) -> int:
    info = preset_info(get_preset(args.preset))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="model size, tokens per frame and KV bytes of a "
                                                "preset",
                                   description=__doc__)
    parser.add_argument("--preset", default="tiny", help="preset name (tiny, wan-1.3b)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
