"""The recipe's ``[parallel]`` section applied to a network: device mesh, bf16 policy,
checkpointing.

The mesh is 1-D (``shard``: every rank holds a slice of one copy, FSDP) or, with
``parallel.shard_size`` below the world size, 2-D ``(replicate, shard)`` (HSDP: each group of
``shard_size`` ranks shards one copy, the groups average gradients). Both dimensions are data
parallel, so the batch is split over all ranks the same way either way. The bf16 policy gathers
parameters as bf16 and reduce-scatters gradients in float32; it never casts forward inputs, because
the DiT keeps its time embedding and modulation in float32 on purpose (casting them would round the
timestep).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from mag.errors import ConfigError
from mag.train.activation import checkpoint_blocks
from mag.train.distributed import DistributedContext
from mag.train.parallelize import parallelize_dit
from mag.train.recipe import MixedPrecision, ParallelConfig

Parallelize = Callable[[nn.Module], nn.Module]
REPLICATE, SHARD = "replicate", "shard"
PARAM_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mesh_shape(world_size: int, shard_size: int) -> tuple[int, int]:
    """``(replicate, shard)`` for ``world_size`` ranks; ``shard_size`` 0, or more than the world
    size (a recipe written for nodes of 8 run on fewer GPUs), means all of them."""
    shard = min(shard_size or world_size, world_size)
    if world_size % shard:
        raise ConfigError(f"parallel.shard_size={shard_size} must divide the number of processes"
                          f" ({world_size}); use 0 to shard over all of them")
    return world_size // shard, shard


def build_mesh(ctx: DistributedContext, shard_size: int = 0) -> DeviceMesh:
    """The data-parallel mesh of this process group: 1-D ``(shard,)`` or 2-D ``(replicate,
    shard)``."""
    replicate, shard = mesh_shape(ctx.world_size, shard_size)
    if replicate == 1:
        return init_device_mesh(ctx.device.type, (shard,), mesh_dim_names=(SHARD,))
    return init_device_mesh(ctx.device.type, (replicate, shard), mesh_dim_names=(REPLICATE, SHARD))


def mixed_precision_policy(name: MixedPrecision) -> MixedPrecisionPolicy:
    """FSDP2 policy: ``bf16`` computes with bf16 parameters and reduces gradients in float32."""
    if name not in PARAM_DTYPES:
        raise ConfigError(f"unknown mixed precision {name!r}; expected one of "
                          f"{', '.join(PARAM_DTYPES)}")
    if name == "fp32":
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[name], reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def needs_process_group(parallel: ParallelConfig) -> bool:
    """Whether even a single process must shard (FSDP2 applies the bf16 policy)."""
    return parallel.mixed_precision != "fp32"


def apply_parallel(model: nn.Module, mesh: DeviceMesh | None, parallel: ParallelConfig, *,
                   trainable: bool = True) -> nn.Module:
    """Activation checkpointing (trainable networks, if asked), then FSDP2 on ``mesh`` (None:
    unsharded)."""
    if trainable and parallel.activation_checkpointing:
        checkpoint_blocks(model)
    if mesh is None:
        return model
    return parallelize_dit(model, mesh,
                           mixed_precision=mixed_precision_policy(parallel.mixed_precision))


def make_parallelize(parallel: ParallelConfig, ctx: DistributedContext, *,
                     grouped: bool) -> tuple[Parallelize, Parallelize]:
    """``(trainable, frozen)`` callables that prepare the trainer's networks.

    ``grouped``: a process group exists (torchrun, or a one-rank group for bf16); without one the
    networks stay unsharded and only activation checkpointing applies.
    """
    if needs_process_group(parallel) and not grouped:
        raise ConfigError(f"parallel.mixed_precision = {parallel.mixed_precision!r} runs through "
                          "FSDP2 and"
                          " needs a process group; start through `mag train` or torchrun")
    mesh = build_mesh(ctx, parallel.shard_size) if grouped else None
    return (functools.partial(apply_parallel, mesh=mesh, parallel=parallel, trainable=True),
            functools.partial(apply_parallel, mesh=mesh, parallel=parallel, trainable=False))
