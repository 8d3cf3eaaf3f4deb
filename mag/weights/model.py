"""External weights -> a ready :class:`WanDiT` with its preset, or a mag model file (``mag weights
convert``).

The preset is the base preset (``wan-1.3b``) with the network shapes read from the weights
(:func:`read_external_dit`), so the same code builds the 1.3B model and small test copies. A mag
model file written here carries the preset, the stage and where the weights came from as metadata,
and loads through :func:`mag.registry.load_model` like any trained model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from mag.config import Preset, get_preset
from mag.errors import CheckpointError
from mag.models import WanDiT
from mag.weights.load import load_into
from mag.weights.sources import MAG_MODEL_FORMAT, ExternalDiT

__all__ = ["BASE_PRESET", "build_dit", "preset_for", "write_model_file"]

BASE_PRESET = "wan-1.3b"
"""Preset that external Wan weights take everything but the network shapes from."""


def preset_for(weights: ExternalDiT, base: str = BASE_PRESET, **overrides: object) -> Preset:
    """``base`` with ``dit`` replaced by the shapes of ``weights`` (plus any dotted ``overrides``);
    the latent channels follow the network's input (the codec is checked against them when it is
    built)."""
    fields = {"video.latent_channels": weights.dit_fields["in_channels"], **overrides}
    return get_preset(base, dit=dict(weights.dit_fields), **fields)


def build_dit(weights: ExternalDiT, preset: Preset, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None) -> WanDiT:
    """A :class:`WanDiT` of ``preset.dit`` holding ``weights`` (eval mode) on ``device`` in
    ``dtype``."""
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    model.to_empty(device=device)
    # non-persistent buffers (RoPE tables); every parameter is overwritten below
    model.init_weights()
    load_into(model, weights.state)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def write_model_file(weights: ExternalDiT, preset: Preset, out: str | Path, *, name: str,
                     stage: str) -> Path:
    """Write ``weights`` as a mag model file (atomic): safetensors + preset / stage / source
    metadata."""
    metadata = {
        "format": MAG_MODEL_FORMAT, "name": name, "stage": stage,
        "preset": json.dumps(preset.to_dict()), "recipe": json.dumps({}), "world": json.dumps({}),
        "commit": "unknown", "train_steps": "0", "train_seconds": "0.0",
        "train_device": "upstream release",
        "source": str(weights.source.path), "source_format": weights.source.kind,
    }
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.state.items()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write model file {out}: {err}") from err
    return out
