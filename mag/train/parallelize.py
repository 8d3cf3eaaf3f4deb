"""FSDP2 for the Wan DiT, applied from outside the model (torchtitan's ``parallelize`` split).

Units, innermost first: ``blocks[i].cross_attn`` (with ``project_context`` registered as an FSDP
forward method), the rest of ``blocks[i]``, and the root. Every rank builds the full model from the
recipe seed before sharding, so an N-rank run starts from the single-process weights. Checkpoints
stay full tensors in the single-process format (:func:`full_model_state`,
:func:`load_full_model_state`, ...: collectives, call them on every rank), so a checkpoint moves
between any world sizes. docs/training.md.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from mag.errors import CheckpointError, ConfigError
from mag.train.distributed import DistributedContext

# Submodule of each block whose method runs outside the block's forward, and that method.
EARLY_UNIT, EARLY_METHODS = "cross_attn", ("project_context",)
# Gather to full tensors on rank 0, on the CPU (what a checkpoint file holds).
FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank passes the same full tensors; each keeps its own shard.
FULL_ON_EVERY_RANK = StateDictOptions(full_state_dict=True, strict=True)

# FSDP2 warns whenever a unit returns a view (the blocks' ``flatten``, ``project_context``'s
# transposes), because an in-place op on it would skip a backward hook. The DiT only ever combines
# these outputs out of place, and tests/test_distributed.py pins sharded gradients to unsharded
# ones.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def parallelize_dit(model: nn.Module, mesh_or_ctx: DeviceMesh | DistributedContext, *,
                    reshard_after_forward: bool = True,
                    mixed_precision: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard ``model`` (a ``WanDiT`` with materialised weights) in place with FSDP2; returns it.

    Args:
        mesh_or_ctx: the data-parallel mesh (1-D, or 2-D ``(replicate, shard)`` for HSDP), or a
        context
            that builds the 1-D one.
        reshard_after_forward: free gathered weights after each unit's forward (ZeRO-3); False keeps
            them until backward (ZeRO-2: less communication, more memory).
        mixed_precision: e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32)``; None computes and reduces in the parameters' dtype.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"parallelize_dit expects a model with a non-empty ModuleList 'blocks',"
                          f" got {type(model).__name__}")
    mesh = mesh_or_ctx.mesh() if isinstance(mesh_or_ctx, DistributedContext) else mesh_or_ctx
    policy = mixed_precision if mixed_precision is not None else MixedPrecisionPolicy()
    for block in blocks:
        early = getattr(block, EARLY_UNIT, None)
        if early is not None:
            fully_shard(early, mesh=mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=policy)
            for method in EARLY_METHODS:
                register_fsdp_forward_method(early, method)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root's weights (embeddings, head) are needed again at the start of backward: keep them.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    # Rollouts project prompts with ``encode_context`` outside ``forward``; it must gather the
    # root's parameters like a forward does.
    if hasattr(model, "encode_context"):
        register_fsdp_forward_method(model, "encode_context")
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------- full state dicts
def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Unsharded model state on rank 0 (CPU); ``{}`` on other ranks. Collective."""
    return get_model_state_dict(model, options=FULL_ON_MAIN)


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (single-process) model state into a sharded model; every rank passes the same
    state."""
    try:
        set_model_state_dict(model, state, options=FULL_ON_EVERY_RANK)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint does not fit the sharded model: {err}") from err


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimiser's index order (what ``Optimizer.state_dict`` keys by)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimiser state on rank 0, keyed like a single-process ``optimizer.state_dict()``
    (parameter indices, not names), so the checkpoint format does not depend on the world size.
    Other ranks get ``{}``. Collective."""
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_MAIN)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[name]: slots for name, slots in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in by_name["param_groups"]],
    }


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Load a single-process (index-keyed, full) optimiser state into a sharded model's
    optimiser."""
    names = _param_names(model, optimizer)
    try:
        by_name = {
            "state": {names[int(i)]: slots for i, slots in state["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=FULL_ON_EVERY_RANK)
    except (IndexError, KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"optimizer state does not fit the sharded model: {err}") from err


# ---------------------------------------------------------------------------- loose tensors (EMA)
def gather_full(tensors: dict[str, Tensor], ctx: DistributedContext) -> dict[str, Tensor]:
    """Full CPU copies of (possibly sharded) tensors on the main rank, ``{}`` elsewhere. Collective.

    Gathers one tensor at a time, so at most one full tensor per rank is in device memory.
    """
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if ctx.is_main:
            out[name] = full.detach().cpu()
    return out


def shard_like(full: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Cut full tensors into the shards ``like`` holds (same mesh and placements); no communication,
    since every rank holds the same full tensors. Names absent from ``like`` are passed through."""
    out: dict[str, Tensor] = {}
    for name, value in full.items():
        ref = like.get(name)
        if isinstance(ref, DTensor):
            if tuple(value.shape) != tuple(ref.shape):
                raise CheckpointError(f"{name}: checkpoint has shape {tuple(value.shape)},"
                                      f" the model {tuple(ref.shape)}")
            value = distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh,
                                      ref.placements, src_data_rank=None)
        out[name] = value
    return out


def local_value(value: Tensor) -> Tensor:
    """A replicated DTensor (e.g. a clipped-gradient norm) as a plain tensor; plain tensors
    unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value
