"""Training checkpoints: one safetensors file per step, written atomically, last K kept.

A checkpoint holds everything an exact resume needs -- model, EMA, optimizer state, RNG state, step
-- plus the recipe and git commit that made it (safetensors metadata, JSON strings), so a shipped
checkpoint says how to reproduce it. Files go through :func:`mag.io.files.atomic_path` (temp file,
fsync, rename): a crash never leaves a truncated ``step_*.safetensors``. Non-finite weights are
never saved and never loaded, so rotation cannot remove the newest finite checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from mag.errors import CheckpointError, InputError
from mag.io.files import atomic_path
from mag.weights import require_finite

CHECKPOINT_FORMAT = "mag-train-v1"
# One file per step, or a sharded folder (``mag.train.dcp``); both count for "latest" and keep_last.
_STEP_FILE = re.compile(r"^step_(\d{8})\.(safetensors|dcp)$")
# Key prefixes inside one checkpoint file.
_MODEL, _EMA, _OPTIM, _RNG, _EXTRA = "model.", "ema.", "optim.", "rng.", "extra."


@dataclass
class TrainingState:
    """What a checkpoint restores. ``optimizer`` is ``torch.optim.Optimizer.state_dict()``."""

    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict[str, Any] | None
    rng: dict[str, Tensor]
    metadata: dict[str, Any]
    extra: dict[str, Tensor]


GIT_COMMIT_ENV = "MAG_GIT_COMMIT"


def git_commit(cwd: str | Path | None = None) -> str:
    """Current commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git.

    ``MAG_GIT_COMMIT`` names it for copies of the tree without ``.git`` (e.g. a lent GPU machine).
    """
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON skeleton."""
    tensors: dict[str, Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for pid, slots in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPTIM}{pid}.{key}"] = value.detach().contiguous().cpu()
                entry[key] = "__tensor__"
            else:
                entry[key] = value
        per_param[str(pid)] = entry
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, Tensor], skeleton: dict[str, Any]) -> dict[str,
                                                                                            Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {
            key: tensors[f"{_OPTIM}{pid}.{key}"] if value == "__tensor__" else value
            for key, value in entry.items()
        }
    return {"state": state, "param_groups": skeleton["param_groups"]}


def capture_rng() -> dict[str, Tensor]:
    """Global RNG states (CPU, and CUDA when present) so a resumed run draws the same numbers."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    return states


def restore_rng(states: dict[str, Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(directory: str | Path, state: TrainingState, keep_last: int = 3) -> Path:
    """Write ``directory/step_XXXXXXXX.safetensors`` atomically; delete all but the newest
    ``keep_last``.

    Weights with a NaN or infinity are refused (CheckpointError, nothing written or deleted).
    """
    require_finite(state.model, f"the model at step {state.step}")
    if state.ema is not None:
        require_finite(state.ema, f"the EMA weights at step {state.step}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot create checkpoint directory {directory}: {err.strerror}"
        ) from err
    tensors: dict[str, Tensor] = {}
    tensors.update({_MODEL + k: v.detach().contiguous().cpu() for k, v in state.model.items()})
    if state.ema is not None:
        tensors.update({_EMA + k: v.detach().contiguous().cpu() for k, v in state.ema.items()})
    optim_skeleton = None
    if state.optimizer is not None:
        optim_tensors, optim_skeleton = flatten_optimizer_state(state.optimizer)
        tensors.update(optim_tensors)
    tensors.update({_RNG + k: v for k, v in state.rng.items()})
    tensors.update({_EXTRA + k: v.detach().contiguous().cpu() for k, v in state.extra.items()})
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(state.step),
        "optimizer": json.dumps(optim_skeleton),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in state.metadata.items()},
    }
    final = directory / f"step_{state.step:08d}.safetensors"
    try:
        with atomic_path(final) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (OSError, InputError) as err:
        raise CheckpointError(f"could not write checkpoint {final}: {err}") from err
    prune_checkpoints(directory, keep_last)
    return final


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (files or DCP folders); 0 keeps every
    one."""
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (temp files from interrupted saves
    ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _STEP_FILE.match(p.name))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint, JSON values decoded. Raises CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file ({err})"
        ) from err
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_checkpoint(path: str | Path) -> TrainingState:
    """Read a checkpoint written by :func:`save_checkpoint`; a corrupt or foreign file:
    CheckpointError."""
    path = Path(path)
    metadata = read_metadata(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a mag training checkpoint (format {metadata.get('format')!r},"
            f" expected {CHECKPOINT_FORMAT!r})"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt ({err})") from err

    def section(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    skeleton = metadata.pop("optimizer", None)
    ema = section(_EMA)
    require_finite(section(_MODEL), f"checkpoint {path}")
    require_finite(ema, f"checkpoint {path} (EMA)")
    return TrainingState(
        step=int(metadata.pop("step")),
        model=section(_MODEL),
        ema=ema or None,
        optimizer=unflatten_optimizer_state(tensors, skeleton) if skeleton else None,
        rng=section(_RNG),
        metadata=metadata,
        extra=section(_EXTRA),
    )


# ---------------------------------------------------------------------------- sharded (DCP) folders
# ``step_XXXXXXXX.dcp/``: written and loaded shard by shard by mag.train.dcp; read whole here
# (export).
DCP_FORMAT = "mag-train-dcp-v1"
DCP_SUFFIX = ".dcp"
DCP_METADATA_FILE = "mag.json"
RNG_KEY, EMA_KEY = "rng", "ema"
# DCP's warning without a process group: it then reads every shard into this process, as a 1-process
# resume or an export wants.
NO_GROUP_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


def is_dcp_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and path.name.endswith(DCP_SUFFIX)


def read_dcp_metadata(path: str | Path) -> dict[str, Any]:
    """``mag.json`` of a DCP checkpoint folder (``step`` an int); CheckpointError if absent or
    foreign."""
    meta_path = Path(path) / DCP_METADATA_FILE
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a complete mag DCP checkpoint (cannot read "
                              f"{DCP_METADATA_FILE}:"
                              f" {err})") from err
    if record.get("format") != DCP_FORMAT:
        raise CheckpointError(f"{path} has format {record.get('format')!r}, expected "
                              f"{DCP_FORMAT!r}")
    return record


def read_dcp_full(path: str | Path) -> TrainingState:
    """The generator's full weights, EMA and metadata of a DCP checkpoint, in one process (for
    ``mag export``); optimiser and critic states are left out."""
    metadata = read_dcp_metadata(path)
    # lazy: torch.distributed.checkpoint adds ~1.5 s to every `mag` start; only export reads DCP
    # here
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_GROUP_WARNING)
        full = Path(tmp) / "full.pt"
        try:
            dcp_to_torch_save(str(path), str(full))
            state = torch.load(full, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, OSError) as err:
            raise CheckpointError(f"cannot read DCP checkpoint {path}: {err}") from err
    step = int(metadata.pop("step"))
    metadata.pop("format", None)
    return TrainingState(step=step, model=state["model.model"], ema=state.get(EMA_KEY) or None,
                         optimizer=None, rng=state.get(RNG_KEY, {}), metadata=metadata, extra={})
def newest_loadable_checkpoint(directory: str | Path) -> tuple[Path, TrainingState,
                                                               list[str]] | None:
    """The newest checkpoint in ``directory`` that loads and verifies, with one line per newer file
    that did not (why it was skipped); None when there are no checkpoints. Raises CheckpointError
    when there are checkpoints but none verifies."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as err:
            skipped.append(f"{path.name}: {err}")
    if skipped:
        raise CheckpointError(
            f"no checkpoint in {directory} can be loaded: " + " | ".join(skipped[:3])
        )
    return None
