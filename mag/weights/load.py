"""One loading path for every weight format: files -> raw tensors -> our names -> a model.

Formats read: ``.safetensors`` (single file, or sharded with a ``*.safetensors.index.json``),
``.pt`` / ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)`` only (no pickled code), or
a directory holding one of those (a diffusers ``transformer/`` folder). Layouts understood:
original Wan2.1 names (identity), diffusers ``WanTransformer3DModel`` names, and Self-Forcing
training checkpoints (``{"generator": ..., "generator_ema": ..., "critic": ...}`` whose generator
keys carry the ``model.`` prefix of its ``WanDiffusionWrapper``).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from mag.errors import CheckpointError
from mag.weights.keymap import KEYS_SHOWN, diffusers_to_wan

WeightFormat = Literal["wan", "diffusers"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
# Self-Forcing checkpoint entries, and the prefix its WanDiffusionWrapper puts on the network's
# keys.
SELF_FORCING_EMA = "generator_ema"
SELF_FORCING_RAW = "generator"
SELF_FORCING_PREFIX = "model."
# Name components added by torch.compile / FSDP / activation checkpointing / DDP wrappers.
WRAPPER_COMPONENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
DDP_PREFIX = "module."
# Keys that identify a layout.
DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", "scale_shift_table")
WAN_MARKERS = ("time_embedding.", "time_projection.", "head.head.", "text_embedding.")


# ---------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Raw contents of a checkpoint file or folder (a flat or nested dict), on CPU.

    Raises:
        CheckpointError: missing path, unknown suffix, ambiguous folder, or an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = _pick_file_in_dir(path)
    name = path.name
    if name.endswith(SAFETENSORS_INDEX_SUFFIX) or name.endswith(".json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(
        f"unknown checkpoint format {path.suffix!r} for {path}; expected .safetensors, a"
        f" {SAFETENSORS_INDEX_SUFFIX} index, or {', '.join(TORCH_SUFFIXES)}"
    )


def _pick_file_in_dir(folder: Path) -> Path:
    for pattern in (f"*{SAFETENSORS_INDEX_SUFFIX}", "*.safetensors",
                    *(f"*{s}" for s in TORCH_SUFFIXES)):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(
                f"{folder} holds several {pattern} files "
                f"({', '.join(p.name for p in found[:KEYS_SHOWN])});"
                " pass the file (or the shard index) itself"
            )
    raise CheckpointError("no checkpoint file (.safetensors, index json, .pt/.pth/.bin) in "
                          f"folder {folder}")


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"cannot read safetensors file {path} (corrupt or truncated?): {err}"
        ) from err


def _read_sharded(index_path: Path) -> dict[str, Any]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read shard index {index_path}: expected JSON with a "
                              "'weight_map'"
                              f" ({err})") from err
    state: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"shard {shard} listed in {index_path} is missing")
        state.update(_read_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{len(missing)} keys listed in {index_path} are in no shard"
                              f" (e.g. {missing[:KEYS_SHOWN]})")
    return state


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile,
            OSError) as err:
        raise CheckpointError(f"cannot read torch checkpoint {path} (corrupt, truncated, or not a"
                              f" weights-only file): {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a dict of tensors")
    return data


# ---------------------------------------------------------------------------------------------
# Layouts


def unwrap_training_checkpoint(data: Mapping[str, Any], *, use_ema: bool = True) -> dict[str,
                                                                                         Tensor]:
    """Flat network state dict out of a raw checkpoint (plain, ``state_dict``-nested or
    Self-Forcing).

    Self-Forcing: ``generator_ema`` is chosen when present and ``use_ema``; otherwise ``generator``.
    Only keys under the wrapper's ``model.`` prefix are the network; other wrapper heads are
    dropped.
    """
    if SELF_FORCING_RAW in data or SELF_FORCING_EMA in data:
        entry = SELF_FORCING_EMA if use_ema and SELF_FORCING_EMA in data else SELF_FORCING_RAW
        if entry not in data:
            raise CheckpointError(f"Self-Forcing checkpoint has no {entry!r} entry (has "
                                  f"{sorted(data)})")
        state = _strip_wrappers(data[entry])
        prefix = SELF_FORCING_PREFIX
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    not_tensors = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint entries {not_tensors[:KEYS_SHOWN]} are not tensors; expected a state dict,"
            f" a 'state_dict' entry, or a Self-Forcing dict with '{SELF_FORCING_EMA}' / "
            f"'{SELF_FORCING_RAW}'"
        )
    return _strip_wrappers(data)


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for component in WRAPPER_COMPONENTS:
            key = key.replace(component, "")
        if key.startswith(DDP_PREFIX):
            key = key[len(DDP_PREFIX):]
        out[key] = value
    return out


def detect_format(state: Mapping[str, Tensor]) -> WeightFormat:
    """``"wan"`` (original names, ours) or ``"diffusers"``; CheckpointError when neither."""
    keys = list(state)
    if any(k.startswith(DIFFUSERS_MARKERS) or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith(WAN_MARKERS) or ".self_attn." in k for k in keys):
        return "wan"
    raise CheckpointError(
        f"cannot tell the checkpoint layout from its keys (e.g. {keys[:KEYS_SHOWN]}); expected "
        "Wan2.1,"
        " diffusers WanTransformer3DModel or Self-Forcing names"
    )


def load_state_dict_any(source: str | Path | Mapping[str, Any], *,
                        use_ema: bool = True) -> dict[str, Tensor]:
    """Read any supported checkpoint and return it under our (original Wan2.1) parameter names.

    Args:
        source: a file, a folder, or an already loaded dict.
        use_ema: for Self-Forcing checkpoints, prefer ``generator_ema`` over ``generator``.
    """
    data = source if isinstance(source, Mapping) else read_checkpoint_file(source)
    state = unwrap_training_checkpoint(data, use_ema=use_ema)
    if not state:
        raise CheckpointError("checkpoint holds no network tensors")
    return diffusers_to_wan(state) if detect_format(state) == "diffusers" else dict(state)


def nonfinite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return [k for k, v in state.items()
            if v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all())]


def require_finite(state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Refuse weights with NaN / infinite values (a diverged run): they would render black video."""
    bad = nonfinite_keys(state)
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights ({len(bad)} tensors, e.g."
                              f" {'; '.join(bad[:KEYS_SHOWN])}): the run that wrote it diverged; "
                              "use an"
                              " earlier checkpoint")


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model`` after checking that keys and shapes match exactly and that
    every value is finite.

    Works for models built on the meta device too (tensors are then assigned, not copied).

    Raises:
        CheckpointError: naming the first few missing / unexpected / wrong-shape / non-finite keys.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong)):
        if items:
            problems.append(f"{len(items)} {label} ({'; '.join(items[:KEYS_SHOWN])})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + ", ".join(problems))
    require_finite(state, source)
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(dict(state), strict=True, assign=on_meta)


__all__ = ["detect_format", "load_into", "load_state_dict_any", "nonfinite_keys",
           "read_checkpoint_file", "require_finite", "unwrap_training_checkpoint"]
