"""The networks a recipe names (``init.model``, ``dmd.teacher``, ``dmd.critic``), from mag or
official files.

A registry name, a mag model file or a mag training checkpoint carries its preset and stage and
loads through :func:`mag.registry.load_model`; anything else (a Wan2.1 folder, a diffusers
``transformer/`` folder, a Self-Forcing or MAG ``.pt`` checkpoint, a plain safetensors state dict)
is read by :func:`mag.weights.load_state_dict_any` into a network built from the recipe's ``dit``
config, which must then fit it exactly (names and shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from mag.checkpoint import CHECKPOINT_FORMAT
from mag.config import DiTConfig
from mag.errors import CheckpointError
from mag.models import WanDiT
from mag.registry import MODEL_FORMAT, load_model, shipped_models
from mag.weights import load_into, load_state_dict_any

MAG_FORMATS = (MODEL_FORMAT, CHECKPOINT_FORMAT)


def is_mag_source(source: str | Path) -> bool:
    """Whether ``source`` is a registry name or a mag model file / training checkpoint."""
    if str(source) in shipped_models():
        return True
    path = Path(source)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") in MAG_FORMATS
    except (SafetensorError, OSError, ValueError):
        return False


def load_network(source: str | Path, dit: DiTConfig, device: torch.device | str = "cpu", *,
                 expect_stage: Sequence[str] | None = None) -> WanDiT:
    """The network of ``source`` on ``device`` in eval mode (mag files keep their own ``dit``
    config; the caller checks it against the recipe's)."""
    if is_mag_source(source):
        return load_model(source, device, expect_stage=expect_stage)[0]
    if not Path(source).exists():
        raise CheckpointError(f"no model named or at {str(source)!r} (a registry name, a mag "
                              "model file, or"
                              " official Wan2.1 / diffusers / Self-Forcing / MAG weights)")
    with torch.device("meta"):
        model = WanDiT(dit)
    model.to_empty(device=device)
    model.init_weights()  # non-persistent buffers (RoPE tables); every parameter is overwritten
    load_into(model, {k: v.to(device) for k, v in load_state_dict_any(source).items()})
    return model.eval()
