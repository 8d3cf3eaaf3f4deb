"""The ``[parallel]`` recipe section: per-block activation checkpointing, the FSDP2 bf16 policy and
the 2-D (replicate x shard) mesh give the gradients of the plain single-process model.

Multi-rank checks spawn gloo process groups on 127.0.0.1 (one thread per process) and compare each
parameter's full gradient with a one-rank run of the same code.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_DIT
from helpers import free_port, random_dit, recipe_dict, recipe_toml
from safetensors.torch import load_file

from mag.cache import FullPolicy
from mag.cli import main
from mag.config import SchedulerConfig
from mag.errors import ConfigError
from mag.objectives.flow_matching import causal_flow_matching_loss
from mag.pipelines.rollout import draw_rollout_noise, self_forcing_rollout
from mag.schedulers import FlowMatchScheduler
from mag.train.activation import checkpoint_blocks, is_checkpointed
from mag.train.distributed import DistributedContext
from mag.train.mesh import apply_parallel, build_mesh, mesh_shape
from mag.train.plan import sharded_numel
from mag.train.recipe import ParallelConfig

BATCH, FRAMES, FRAMES_PER_BLOCK, TEXT_TOKENS = 4, 6, 3, 3
FRAME_SHAPE = (TINY_DIT.in_channels, 4, 4)
# Activation checkpointing recomputes the same float32 ops in the same order: equal up to 1e-6.
AC_TOLERANCE = 1e-6
# bf16 keeps 8 significand bits: unit roundoff u = 2^-8. Each rank's weight gradient is computed in
# bf16 and rounded once (relative error <= u of its magnitude), then averaged in float32; the 1-rank
# gradient rounds the whole batch's sum once. Two roundings of at most the tensor's largest
# magnitude apart: 2u. Measured worst: 0.0051 of the largest magnitude (time_embedding.0.bias, 2
# ranks vs 1, FSDP and HSDP).
BF16_UNIT_ROUNDOFF = 2.0 ** -8
BF16_TOLERANCE = 2 * BF16_UNIT_ROUNDOFF


def _scheduler() -> FlowMatchScheduler:
    return FlowMatchScheduler(SchedulerConfig(shift=3.0), "velocity")


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    blocks = FRAMES // FRAMES_PER_BLOCK
    return {"video": torch.randn(BATCH, FRAMES, *FRAME_SHAPE, generator=gen),
            "noise": torch.randn(BATCH, FRAMES, *FRAME_SHAPE, generator=gen),
            "context": torch.randn(BATCH, TEXT_TOKENS, TINY_DIT.text_dim, generator=gen),
            "timestep": torch.rand(BATCH, blocks, generator=gen) * 1000}


def _flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        rows: range) -> torch.Tensor:
    b = {k: v[rows.start:rows.stop] for k, v in batch.items()}
    return causal_flow_matching_loss(model, _scheduler(), b["video"], b["context"],
                                     FRAMES_PER_BLOCK, b["noise"], b["timestep"]).loss


def _rollout_loss(model: torch.nn.Module) -> torch.Tensor:
    """A Self-Forcing rollout: exit steps read a KV cache that later blocks' write passes extend."""
    scheduler, blocks = _scheduler(), 3
    gen = torch.Generator().manual_seed(5)
    steps = len(scheduler.config.denoising_steps)
    draws = draw_rollout_noise(2, blocks, FRAMES_PER_BLOCK, FRAME_SHAPE, steps, gen)
    context = torch.randn(2, TEXT_TOKENS, TINY_DIT.text_dim, generator=gen)
    x = self_forcing_rollout(model, scheduler, context, num_blocks=blocks,
                             frames_per_block=FRAMES_PER_BLOCK,
                             frame_shape=FRAME_SHAPE, policy=FullPolicy(), exit_step=2,
                             noise_draws=draws)
    return x.square().mean()


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["flow_matching", "rollout_with_kv_cache"])
def test_activation_checkpointing_gives_the_gradients_of_the_plain_model(path):
    plain = random_dit(TINY_DIT).train()
    checkpointed = checkpoint_blocks(copy.deepcopy(plain))
    assert all(is_checkpointed(block) for block in checkpointed.blocks)
    # Same names: checkpoints and weight files do not see the wrapping.
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    batch = _batch()

    def loss(model: torch.nn.Module) -> torch.Tensor:
        if path == "flow_matching":
            return _flow_matching_loss(model, batch, range(BATCH))
        return _rollout_loss(model)

    expected, got = _grads(plain, loss(plain)), _grads(checkpointed, loss(checkpointed))
    assert expected.keys() == got.keys() and len(expected) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=AC_TOLERANCE, msg=name)
    assert max(g.abs().max() for g in expected.values()) > 1e-3  # not vacuous


def test_activation_checkpointing_recomputes_in_backward():
    """The checkpointed model keeps fewer saved tensors alive between forward and backward."""

    def saved_bytes(model: torch.nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _flow_matching_loss(model, _batch(), range(BATCH))
        return total

    plain = random_dit(TINY_DIT).train()
    assert saved_bytes(checkpoint_blocks(copy.deepcopy(plain))) < saved_bytes(plain) / 2


def test_mesh_shape_is_replicate_by_shard_and_refuses_a_shard_size_that_does_not_divide():
    assert mesh_shape(8, 0) == (1, 8)
    assert mesh_shape(8, 4) == (2, 4)
    assert mesh_shape(64, 8) == (8, 8)
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        mesh_shape(8, 3)
    assert mesh_shape(2, 8) == (1, 2)  # a recipe for nodes of 8 on 2 GPUs


# ----------------------------------------------------------------------------------------
# multi-rank
def _grad_worker(rank: int, world: int, port: int, out: str, parallel: ParallelConfig) -> None:
    """One rank: shard a seeded tiny DiT under ``parallel``, backprop its slice of the batch, and
    (rank 0) save every parameter's full gradient."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistributedContext(rank=rank, world_size=world)
        model = apply_parallel(random_dit(TINY_DIT).train(), build_mesh(ctx, parallel.shard_size),
                               parallel)
        loss = _flow_matching_loss(model, _batch(), ctx.batch_slice(BATCH))
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        mesh_dims = model.blocks[0].self_attn.q.weight.device_mesh.mesh_dim_names
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        if rank == 0:
            torch.save({"grads": grads, "mesh": mesh_dims, "local_numel": local_numel,
                        "dtype": str(model.blocks[0].self_attn.q.weight.dtype)}, out)
    finally:
        dist.destroy_process_group()


def _spawn_grads(tmp: Path, world: int, parallel: ParallelConfig, name: str) -> dict:
    out = tmp / f"{name}.pt"
    mp.spawn(_grad_worker, args=(world, free_port(), str(out), parallel), nprocs=world, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("bf16")
    bf16 = ParallelConfig(mixed_precision="bf16")
    bf16_ac = ParallelConfig(mixed_precision="bf16", activation_checkpointing=True)
    return {"one": _spawn_grads(tmp, 1, bf16, "one"),
            "two": _spawn_grads(tmp, 2, bf16_ac, "two"),
            "two_hsdp": _spawn_grads(tmp, 2, ParallelConfig(mixed_precision="bf16", shard_size=1),
                                     "hsdp"),
            "two_fp32": _spawn_grads(tmp, 2, ParallelConfig(), "fp32"),
            "two_fp32_ac": _spawn_grads(tmp, 2, ParallelConfig(activation_checkpointing=True),
                                        "fp32_ac"),
            "fp32": {"grads": _fp32_grads()}}


def _fp32_grads() -> dict[str, torch.Tensor]:
    model = random_dit(TINY_DIT).train()
    return _grads(model, _flow_matching_loss(model, _batch(), range(BATCH)))


def _worst_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(((a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-12),
                 k) for k in a)
    return worst


@pytest.mark.parametrize("run", ["two", "two_hsdp"])
def test_bf16_gradients_of_two_ranks_equal_one_rank(bf16_runs, run):
    """2 ranks (FSDP with activation checkpointing; HSDP on a (2, 1) mesh) vs 1 rank, all bf16: each
    parameter's gradient within 2u of its largest magnitude."""
    worst, name = _worst_relative(bf16_runs[run]["grads"], bf16_runs["one"]["grads"])
    assert worst <= BF16_TOLERANCE, f"{name}: {worst:.3g} of its max"
    assert bf16_runs[run]["dtype"] == "torch.float32"  # master weights stay float32
    expected_mesh = ("replicate", "shard") if run == "two_hsdp" else ("shard",)
    assert bf16_runs[run]["mesh"] == expected_mesh
    # What `mag train --plan` counts per GPU is what rank 0 holds (FSDP pads dim 0 of every
    # parameter).
    shard = 1 if run == "two_hsdp" else 2
    assert bf16_runs[run]["local_numel"] == sharded_numel(random_dit(TINY_DIT), shard)


def test_activation_checkpointing_gives_the_same_gradients_on_two_ranks(bf16_runs):
    """FSDP2 on 2 ranks, float32: checkpointed blocks give the gradients of plain blocks within
    1e-6."""
    plain, checkpointed = bf16_runs["two_fp32"]["grads"], bf16_runs["two_fp32_ac"]["grads"]
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=AC_TOLERANCE,
                                   msg=name)


def test_bf16_policy_computes_in_bf16(bf16_runs):
    """The bf16 gradients differ from float32 ones by bf16 rounding, not by nothing (the policy is
    on)."""
    worst, name = _worst_relative(bf16_runs["one"]["grads"], bf16_runs["fp32"]["grads"])
    assert BF16_UNIT_ROUNDOFF / 16 < worst < 0.5


def test_bf16_recipe_trains_in_one_process_and_resumes_exactly(tmp_path):
    """`mag train` without torchrun: bf16 runs through a one-rank group; the DCP checkpoint resumes
    to the uninterrupted run's weights bit for bit (compared through `mag export`)."""
    data = recipe_dict("causal_fm", loop={"batch_size": 2, "grad_accum": 1},
                       parallel={"mixed_precision": "bf16", "activation_checkpointing": True,
                                 "checkpoint": "dcp"})
    recipe = tmp_path / "bf16.toml"
    recipe.write_text(recipe_toml(data))
    base = ["train", "--recipe", str(recipe), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "straight")]) == 0
    assert main([*base, "--out", str(tmp_path / "resumed"), "--max-steps", "1"]) == 0
    assert main([*base, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert not dist.is_initialized()  # the one-rank group is gone again
    exported = []
    for run in ("straight", "resumed"):
        out = tmp_path / f"{run}.safetensors"
        assert main(["export", str(tmp_path / run), "-o", str(out), "--name", run, "--stage",
                     "causal"]) == 0
        exported.append(load_file(str(out)))
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])

