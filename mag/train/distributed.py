"""Process groups for data-parallel training: who am I, which device, how to average logged numbers.

``torchrun`` (or ``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the group (gloo
on CPU, nccl on CUDA). Without them -- a plain ``mag train`` -- it returns a single-process context
and creates no process group, so the same trainer code runs either way.

Together with ``mag.train.parallelize`` this is the only place that imports ``torch.distributed``;
models and caches stay free of it (torchtitan's split: parallelism is applied from outside).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mag.errors import ConfigError

# Environment variables torchrun sets for every worker.
ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
ENV_MASTER_ADDR, ENV_MASTER_PORT = "MASTER_ADDR", "MASTER_PORT"
BACKEND_BY_DEVICE = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the data-parallel group.

    Attributes:
        rank: global rank in ``[0, world_size)``; rank 0 is the main process (writes files, logs).
        world_size: number of processes; 1 means no process group exists.
        local_rank: rank on this node, selects the GPU (``cuda:local_rank``).
        device: where this rank's model shard and batches live.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def mesh(self) -> DeviceMesh:
        """The 1-D data-parallel device mesh over all ranks (FSDP shards parameters along it)."""
        if not self.is_distributed:
            raise ConfigError("a device mesh needs a process group (world_size > 1); launch with "
                              "torchrun")
        return init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))

    def batch_slice(self, micro_batch_size: int) -> range:
        """This rank's sample indices of a micro-batch: ``[r*b/W, (r+1)*b/W)`` (disjoint, equal
        slices).

        Equal slices make the FSDP-averaged gradient equal to the single-process gradient of the
        whole micro-batch, so a W-rank run follows the 1-rank run up to float reduction order.
        """
        if micro_batch_size % self.world_size:
            raise ConfigError(
                f"the micro-batch (loop.batch_size / loop.grad_accum = {micro_batch_size}) must "
                "be divisible"
                f" by the number of processes ({self.world_size}); change loop.batch_size or "
                "--nproc_per_node"
            )
        per_rank = micro_batch_size // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"environment variable {name} must be an integer, found {value!r}"
        ) from None


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether the torchrun variables are present (``WORLD_SIZE`` is the one every launcher
    sets)."""
    return ENV_WORLD_SIZE in (os.environ if env is None else env)


def init_distributed(device: torch.device | str = "cpu", env: Mapping[str, str] | None = None, *,
                     single_group: bool = False) -> DistributedContext:
    """Join the process group described by the torchrun environment, or run as a single process.

    ``device`` is the device *type* the user asked for: ``cuda`` becomes ``cuda:LOCAL_RANK`` (nccl),
    ``cpu`` stays ``cpu`` (gloo). With no torchrun variables, or ``WORLD_SIZE=1``, no group is
    created unless ``single_group`` asks for a one-rank group (in-process store; FSDP2's bf16 policy
    needs one).
    """
    env = os.environ if env is None else env
    device = torch.device(device)
    if not launched_by_torchrun(env) or _env_int(env, ENV_WORLD_SIZE) == 1:
        if single_group and not dist.is_initialized():
            backend = _backend(device)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return DistributedContext(device=device)
    world_size, rank = _env_int(env, ENV_WORLD_SIZE), _env_int(env, ENV_RANK)
    local_rank = _env_int(env, ENV_LOCAL_RANK) if ENV_LOCAL_RANK in env else rank
    missing = [name for name in (ENV_MASTER_ADDR, ENV_MASTER_PORT) if not env.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set;"
                          " launch with torchrun")
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    backend = _backend(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank,
                              device=device)


def _backend(device: torch.device) -> str:
    backend = BACKEND_BY_DEVICE.get(device.type)
    if backend is None:
        raise ConfigError(f"distributed training runs on {' or '.join(BACKEND_BY_DEVICE)},"
                          f" not {device.type!r}")
    return backend


def has_group() -> bool:
    """Whether this process is in a process group (torchrun's, or a one-rank group)."""
    return dist.is_initialized()


def destroy(ctx: DistributedContext) -> None:
    """Leave the process group, including a one-rank group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (e.g. until the main rank has written a checkpoint)."""
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_mean(values: dict[str, Tensor], ctx: DistributedContext) -> dict[str, Tensor]:
    """Mean over ranks of 0-dim tensors, in one collective; called only when a log record is
    written."""
    if not ctx.is_distributed or not values:
        return values
    names = list(values)
    stacked = torch.stack([values[n].detach().float().to(ctx.device) for n in names])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= ctx.world_size
    return dict(zip(names, stacked.unbind(), strict=True))


def all_reduce_sum(tensor: Tensor, ctx: DistributedContext) -> Tensor:
    """Sum over ranks (a copy; the input is untouched)."""
    out = tensor.detach().clone()
    if ctx.is_distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
