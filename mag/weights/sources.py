"""What a user-given weights path is, and the DiT shapes it holds.

Formats told apart (:func:`detect_source`), each by what is on disk, never by the name alone:
- ``mag-model``: one safetensors file whose metadata says ``format=mag-model-v1`` (``mag export`` /
  ``mag weights convert``), or a ``mag train`` checkpoint (safetensors with a ``preset`` in its
  metadata);
- ``wan2.1``: the original Wan2.1 release folder (``config.json`` +
  ``diffusion_pytorch_model*.safetensors`` beside ``Wan2.1_VAE.pth`` /
  ``models_t5_umt5-xxl-enc-bf16.pth``);
- ``official-mag``: a diffusers-``ModelMixin`` folder of Wan-named weights (MAG's generator / memory
  folders, ``CausalWanModel``: ``config.json`` + ``diffusion_pytorch_model.safetensors``);
- ``diffusers``: a ``WanTransformer3DModel`` folder, or a pipeline root holding ``transformer/``;
- ``self-forcing``: a ``.pt`` with ``generator`` / ``generator_ema`` entries (read weights-only).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mag.errors import CheckpointError
from mag.weights.load import SELF_FORCING_EMA, SELF_FORCING_RAW, load_state_dict_any

__all__ = ["MAG_MODEL_FORMAT", "SOURCE_KINDS", "ExternalDiT", "SourceKind", "WeightSource",
           "detect_source", "dit_fields_from_state", "read_dit_config", "read_external_dit"]

SourceKind = Literal["mag-model", "wan2.1", "official-mag", "diffusers", "self-forcing"]
SOURCE_KINDS: tuple[str, ...] = ("mag-model", "wan2.1", "official-mag", "diffusers", "self-forcing")
MAG_MODEL_FORMAT = "mag-model-v1"
"""``format`` metadata of a mag model file."""
CONFIG_FILE = "config.json"
WAN_WEIGHTS_GLOB = "diffusion_pytorch_model*.safetensors"
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
DIFFUSERS_CLASS = "WanTransformer3DModel"
WAN_HEAD_DIM = 128
"""Head width of every released Wan2.1 model; used for ``num_heads`` only when no config.json says
it."""
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# A key every Wan DiT layout has (ours / Wan2.1 / Self-Forcing: patch_embedding; diffusers: the same
# name).
DIT_MARKER = "patch_embedding.weight"
_FILES_SHOWN = 6
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
EXPECTED = ("a mag model file (.safetensors), a Wan2.1 folder, an official MAG generator/memory "
            "folder"
            " (config.json + diffusion_pytorch_model.safetensors), a diffusers "
            "WanTransformer3DModel folder,"
            " or a Self-Forcing .pt")


@dataclass(frozen=True)
class WeightSource:
    """A detected weights path.

    Attributes:
        kind: the format (module docstring).
        path: what the user gave.
        weights: the file, shard index or folder the DiT tensors are read from.
        config: the config.json describing the DiT, when the format has one.
    """

    kind: SourceKind
    path: Path
    weights: Path
    config: Path | None = None


def detect_source(path: str | Path) -> WeightSource:
    """Tell the format of ``path``; CheckpointError naming what was found and what was expected."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights not found: {path} does not exist; expected {EXPECTED}")
    if path.is_dir():
        return _detect_folder(path)
    if path.suffix == ".safetensors":
        meta = _safetensors_metadata(path)
        if meta.get("format") == MAG_MODEL_FORMAT or "preset" in meta:
            return WeightSource("mag-model", path, path)
        config = path.parent / CONFIG_FILE
        if config.is_file():
            return _with_config(path.parent, path, config)
        raise CheckpointError(f"{path} is a safetensors file without mag metadata and without a "
                              "config.json"
                              f" beside it; expected {EXPECTED}")
    if path.suffix in TORCH_SUFFIXES:
        _check_torch_dit(path)
        return WeightSource("self-forcing", path, path)
    raise CheckpointError(f"{path} has the unknown suffix {path.suffix!r}; expected {EXPECTED}")


def _detect_folder(folder: Path) -> WeightSource:
    if (folder / "transformer" / CONFIG_FILE).is_file():
        folder = folder / "transformer"
    config = folder / CONFIG_FILE
    shards = sorted(folder.glob(WAN_WEIGHTS_GLOB))
    if config.is_file() and shards:
        index = [s for s in shards if s.name.endswith(".index.json")]
        weights = index[0] if index else (shards[0] if len(shards) == 1 else folder)
        return _with_config(folder, weights, config)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = (
        ", ".join(found[:_FILES_SHOWN]) + (", ..." if len(found) > _FILES_SHOWN else "")
        or "nothing"
    )
    raise CheckpointError(f"{folder} holds {shown}; expected {EXPECTED}")


def _with_config(folder: Path, weights: Path, config: Path) -> WeightSource:
    data = _read_json(config)
    if data.get("_class_name") == DIFFUSERS_CLASS:
        return WeightSource("diffusers", folder, weights, config)
    if (folder / WAN_VAE_FILE).is_file() or (folder / WAN_T5_FILE).is_file():
        return WeightSource("wan2.1", folder, weights, config)
    return WeightSource("official-mag", folder, weights, config)


def _check_torch_dit(path: Path) -> None:
    """A ``.pt`` must hold a Self-Forcing dict or a DiT state dict; read memory-mapped (no tensor
    data)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # torch raises many types for a damaged, legacy or non-weights-only file
    except Exception as err:
        raise CheckpointError(f"cannot read {path} as a weights-only torch file: {err}") from err
    keys = list(data) if isinstance(data, dict) else []
    inner = data.get(SELF_FORCING_EMA, data.get(SELF_FORCING_RAW)) if isinstance(data,
                                                                                 dict) else None
    names = [str(k) for k in (inner if isinstance(inner, dict) else keys)]
    if not any(name.endswith(DIT_MARKER) for name in names):
        shown = [str(k) for k in keys[:_FILES_SHOWN]]
        raise CheckpointError(f"{path} holds {len(keys)} entries (e.g. {shown}), not a DiT; "
                              "expected"
                              f" {EXPECTED}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err})") from err


# ---------------------------------------------------------------------------------------------
# DiT shapes


def dit_fields_from_state(state: Mapping[str, Tensor], num_heads: int | None = None) -> dict[str,
                                                                                             Any]:
    """``DiTConfig`` fields read from a Wan-named state dict's shapes (``num_heads``: given, or dim
    / 128)."""
    try:
        patch = state["patch_embedding.weight"]
        dim, in_channels, *patch_size = patch.shape
        head = state["head.head.weight"]
        fields = {
            "in_channels": int(in_channels), "dim": int(dim),
            "patch_size": tuple(int(p) for p in patch_size),
            "out_channels": int(head.shape[0]) // math.prod(patch_size),
            "ffn_dim": int(state["blocks.0.ffn.0.weight"].shape[0]),
            "text_dim": int(state["text_embedding.0.weight"].shape[1]),
            "freq_dim": int(state["time_embedding.0.weight"].shape[1]),
            "num_layers": 1 + max(int(m.group(1)) for m in map(_BLOCK_INDEX.match, state) if m),
            "qk_norm": "blocks.0.self_attn.norm_q.weight" in state,
            "cross_attn_norm": "blocks.0.norm3.weight" in state,
        }
    except (KeyError, ValueError) as err:
        found = list(state)[:_FILES_SHOWN]
        raise CheckpointError(
            f"the weights are not a Wan DiT (no {err}); found keys {found}"
        ) from err
    fields["num_heads"] = int(num_heads) if num_heads else max(1, fields["dim"] // WAN_HEAD_DIM)
    return fields


def read_dit_config(source: WeightSource) -> dict[str, Any]:
    """The config.json values that shapes cannot give (heads, eps), under ``DiTConfig`` names."""
    if source.config is None:
        return {}
    data = _read_json(source.config)
    out: dict[str, Any] = {}
    if source.kind == "diffusers":
        if "num_attention_heads" in data:
            out["num_heads"] = int(data["num_attention_heads"])
    elif "num_heads" in data:
        out["num_heads"] = int(data["num_heads"])
    if "eps" in data:
        out["eps"] = float(data["eps"])
    return out


@dataclass(frozen=True)
class ExternalDiT:
    """Weights from a non-mag format: the source, the tensors under our (Wan) names, ``DiTConfig``
    fields."""

    source: WeightSource
    state: dict[str, Tensor]
    dit_fields: dict[str, Any]


def read_external_dit(path: str | Path, *, use_ema: bool = True,
                      shapes_from: WeightSource | None = None) -> ExternalDiT:
    """Read a Wan2.1 / official MAG / diffusers / Self-Forcing DiT.

    ``shapes_from``: a source whose config.json gives what a bare ``.pt`` cannot (heads, eps), e.g.
    the Wan2.1 folder a Self-Forcing checkpoint was trained from; used only when ``path`` has no
    config.
    """
    source = detect_source(path)
    if source.kind == "mag-model":
        raise CheckpointError(f"{path} is a mag model file; load it with mag.registry.load_model")
    state = load_state_dict_any(source.weights, use_ema=use_ema)
    config = read_dit_config(
        source if source.config is not None or shapes_from is None else shapes_from
    )
    fields = dit_fields_from_state(state, config.get("num_heads"))
    if "eps" in config:
        fields["eps"] = config["eps"]
    return ExternalDiT(source, state, fields)
