"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP): no rank-0 gather.

A checkpoint is a folder ``step_XXXXXXXX.dcp/`` in the run's ``checkpoints/``: every rank writes its
own shards of the networks, their AdamW states and the EMA (DCP's ``.distcp`` files and plan), and
rank 0 adds ``mag.json`` (step, recipe, preset, commit, ...). The folder is written as ``*.tmp`` and
renamed once every rank has finished, so a crash never leaves a partial ``step_*.dcp``. Loading
reshards: a folder written by N ranks loads onto M ranks, or into an unsharded single process, with
the exact float values (tensors are cut and read, never reduced). Optimiser states are keyed by
parameter name, so they too move between world sizes. The global RNG state of rank 0 is stored.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mag.checkpoint import (
    DCP_FORMAT,
    DCP_METADATA_FILE,
    DCP_SUFFIX,
    EMA_KEY,
    NO_GROUP_WARNING,
    RNG_KEY,
    capture_rng,
    prune_checkpoints,
    read_dcp_metadata,
    restore_rng,
)
from mag.errors import CheckpointError
from mag.train.distributed import DistributedContext, barrier

TMP_SUFFIX = ".tmp"


@dataclass
class Trained:
    """One trained network of a run and its optimiser (the generator, and the DMD critic)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


def _state(networks: dict[str, Trained], ema: dict[str, Tensor]) -> dict[str, Any]:
    """DCP's state dict: sharded (DTensor) or plain tensors, by reference where DCP loads in
    place."""
    state: dict[str, Any] = {EMA_KEY: ema, RNG_KEY: capture_rng()}
    for name, net in networks.items():
        state[f"{name}.model"] = get_model_state_dict(net.model)
        state[f"{name}.optimizer"] = get_optimizer_state_dict(net.model, net.optimizer)
    return state


def save_dcp(directory: str | Path, step: int, networks: dict[str, Trained], ema: dict[str, Tensor],
             metadata: dict[str, Any], ctx: DistributedContext, keep_last: int) -> Path:
    """Write ``directory/step_XXXXXXXX.dcp`` (collective: every rank calls it); keep the newest
    ``keep_last`` checkpoints. Returns the folder on every rank."""
    directory = Path(directory)
    final = directory / f"step_{step:08d}{DCP_SUFFIX}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if ctx.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(ctx)
    dcp.save(_state(networks, ema), checkpoint_id=str(tmp))
    barrier(ctx)
    if ctx.is_main:
        record = {"format": DCP_FORMAT, "step": step, **metadata}
        (tmp / DCP_METADATA_FILE).write_text(json.dumps(record))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(directory, keep_last)
    barrier(ctx)
    return final


def load_dcp(path: str | Path, networks: dict[str, Trained], ema: dict[str, Tensor]) -> dict[str,
                                                                                             Any]:
    """Load a DCP checkpoint into the (sharded or plain) networks, optimisers and EMA shadow in
    place; restores the global RNG; returns its metadata. Collective under a process group."""
    metadata = read_dcp_metadata(path)
    state = _state(networks, ema)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_GROUP_WARNING)
            dcp.load(state, checkpoint_id=str(path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"DCP checkpoint {path} does not fit this run's networks: {err}"
        ) from err
    for name, net in networks.items():
        set_model_state_dict(net.model, state[f"{name}.model"])
        set_optimizer_state_dict(net.model, net.optimizer, state[f"{name}.optimizer"])
    restore_rng(state[RNG_KEY])
    return metadata


def check_memory_record(stored: Any, current: dict[str, str]) -> None:
    """Refuse a resume whose caches (``mag`` rollouts, ``horizon`` streams) would be written by
    other memory-model weights than the run's."""
    if isinstance(stored,
                  dict) and current and stored.get("weights_sha256") != current["weights_sha256"]:
        raise CheckpointError(f"memory model {current['source']!r} has other weights than the"
                              " memory"
                              f" model this run started with ({stored.get('source')!r}); resume "
                              "with the same"
                              " memory model file, or start a new run")
