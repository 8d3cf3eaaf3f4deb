"""``mag train --plan``: per-GPU memory and step FLOPs of a recipe on N GPUs, from meta-device
models.

Nothing is allocated: the networks are built on the meta device. Parameters, gradients, AdamW state
and EMA are counted from the parameters' own shapes, cut the way FSDP2 cuts them (dim 0 padded to a
multiple of the shard group). Activations and FLOPs come from one meta forward of a 1- and a 2-layer
network (per-layer and outside-the-blocks parts, so any depth costs nothing more), recording what
autograd saves for backward; attention is counted as a fused kernel saves it (q, k, v, output and
log-sum-exp, no score matrix), which is what GPUs run. Step FLOPs are an estimate (see docs/).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mag.config import DiTConfig, Preset
from mag.models import WanDiT
from mag.train.activation import checkpoint_blocks
from mag.train.distributed import DistributedContext
from mag.train.mesh import PARAM_DTYPES, mesh_shape
from mag.train.recipe import Recipe

GPU_BYTES = 80 * 10 ** 9  # an 80 GB GPU (H100 / A100 80GB)
GB = 10 ** 9
MASTER_BYTES = 4           # float32 master weights, gradients, AdamW moments, EMA
# exp_avg, exp_avg_sq; plus one float32 ``step`` scalar per parameter tensor
ADAM_MOMENTS = 2
BACKWARD_FORWARDS = 2      # a backward costs about two forwards
UNITS_IN_FLIGHT = 2        # FSDP2 gathers the next unit while computing the current one


@dataclass(frozen=True)
class Network:
    name: str
    trainable: bool
    ema: bool = False


@dataclass(frozen=True)
class TrainingPlan:
    """Per-GPU bytes of one recipe on ``gpus x nodes`` GPUs (``shard`` ranks per weight copy)."""

    recipe: str
    world: int
    nodes: int
    replicate: int
    shard: int
    mixed_precision: str
    networks: tuple[tuple[str, int, bool], ...]  # name, parameters, trained
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    gathered_bytes: int
    activations_bytes: int
    activations_checkpointed_bytes: int
    samples_per_gpu: float
    step_flops_per_gpu: float

    def total_bytes(self, checkpointing: bool) -> int:
        states = self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.ema_bytes
        acts = self.activations_checkpointed_bytes if checkpointing else self.activations_bytes
        return states + self.gathered_bytes + acts

    def fits(self, checkpointing: bool, gpu_bytes: int = GPU_BYTES) -> bool:
        return self.total_bytes(checkpointing) <= gpu_bytes

    def format(self) -> str:
        nets = ", ".join(f"{name} {n / 1e9:.2f} B ({'trained' if trained else 'frozen'})"
                         for name, n, trained in self.networks)
        rows = [("parameters (float32 shards)", self.params_bytes), ("gradients", self.grads_bytes),
                ("AdamW state", self.optimizer_bytes), ("EMA", self.ema_bytes),
                ("gathered units (FSDP)", self.gathered_bytes),
                ("activations, no checkpointing", self.activations_bytes),
                ("activations, checkpointing", self.activations_checkpointed_bytes)]
        lines = [f"plan: {self.recipe} on {self.world} GPU(s), {self.nodes} node(s); mesh replicate"
                 f" {self.replicate} x shard {self.shard}; {self.mixed_precision}",
                 f"networks: {nets}",
                 f"micro-batch samples per GPU: {self.samples_per_gpu:g}",
                 "per GPU:"]
        lines += [f"  {label:<32}{value / GB:9.2f} GB" for label, value in rows]
        for checkpointing in (False, True):
            verdict = "fits" if self.fits(checkpointing) else "does NOT fit"
            lines.append(
                "  "
                f"{'total, ' + ('checkpointing' if checkpointing else 'no checkpointing'):<32}"
                f"{self.total_bytes(checkpointing) / GB:9.2f} GB  ({verdict} an 80 GB "
                "GPU)"
            )
        lines.append(f"step: {self.step_flops_per_gpu / 1e12:.1f} TFLOP per GPU"
                     f" ({self.step_flops_per_gpu * self.world / 1e15:.2f} PFLOP in all)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ states
def networks_of(recipe: Recipe) -> tuple[Network, ...]:
    """The networks a run holds: the trained one (with EMA), and for DMD critic, teacher, memory
    model."""
    nets = [Network("generator" if recipe.causal else "model", trainable=True, ema=True)]
    if recipe.objective.kind == "dmd":
        nets += [Network("critic", trainable=True), Network("teacher", trainable=False)]
        if recipe.dmd.rollout_policy == "mag":
            nets.append(Network("memory", trainable=False))
    if recipe.objective.kind == "horizon":
        nets.append(Network("memory", trainable=False))
    return tuple(nets)


def meta_model(cfg: DiTConfig, dtype: torch.dtype = torch.float32) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(cfg).to(dtype)


def sharded_numel(model: nn.Module, shard: int) -> int:
    """Parameters held by the largest rank when FSDP2 shards ``model`` over ``shard`` ranks (dim 0
    of every parameter padded to a multiple of ``shard``)."""
    return sum(math.ceil(p.shape[0] / shard) * (p.numel() // p.shape[0]) if p.ndim else p.numel()
               for p in model.parameters())


def _units(model: WanDiT) -> list[int]:
    """Parameter counts of the FSDP units of :func:`mag.train.parallelize.parallelize_dit` (blocks,
    each block's cross-attention), and the root's last."""
    units: list[int] = []
    in_blocks = 0
    for block in model.blocks:
        cross = sum(p.numel() for p in block.cross_attn.parameters())
        rest = sum(p.numel() for p in block.parameters()) - cross
        units += [cross, rest]
        in_blocks += cross + rest
    return units + [sum(p.numel() for p in model.parameters()) - in_blocks]


# ------------------------------------------------------------------------------ activations, FLOPs
class _FusedAttention(torch.autograd.Function):
    """Meta stand-in for a fused attention kernel: saves q, k, v, output and the float32
    log-sum-exp."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor,
                v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor,
                                                                                  Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def _measured_attention(flops: list[float]) -> Iterator[None]:
    def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  **_: object) -> Tensor:
        batch_heads = math.prod(q.shape[:-2])
        flops.append(4.0 * batch_heads * q.shape[-2] * k.shape[-2] * q.shape[-1])  # QK^T and PV
        return _FusedAttention.apply(q, k, v)

    with mock.patch.object(F, "scaled_dot_product_attention", attention):
        yield


def _forward_cost(preset: Preset, layers: int, frames: int, dtype: torch.dtype,
                  checkpointing: bool) -> tuple[int, float]:
    """(bytes saved for backward, forward FLOPs) of one sample of ``frames`` latent frames."""
    cfg = dataclasses.replace(preset.dit, num_layers=layers)
    model = meta_model(cfg, dtype).train()
    if checkpointing:
        checkpoint_blocks(model)
    video = preset.video
    with torch.device("meta"):
        x = torch.empty(1, frames, cfg.in_channels, video.latent_height, video.latent_width)
        timestep = torch.empty(1, frames)
        context = torch.empty(1, preset.text_max_tokens, cfg.text_dim)
        offsets = torch.zeros(1, frames) if cfg.camera_rope else None
    saved = 0
    weights = {id(p) for p in model.parameters()}

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if id(t) not in weights and id(t._base) not in weights:  # saved weights are no activations
            saved += t.numel() * t.element_size()
        return t

    attention_flops: list[float] = []
    counter = FlopCounterMode(display=False)
    with (
        _measured_attention(attention_flops),
        counter,
        torch.autograd.graph.saved_tensors_hooks(pack, _same),
    ):
        out = model(x, timestep, context, width_offsets=offsets)
    del out  # with checkpointing, what is saved outside the blocks includes every block's input
    return saved, counter.get_total_flops() + sum(attention_flops)


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class SampleCost:
    """Activation bytes (without / with checkpointing) and forward FLOPs of one sample of some
    frames."""

    activations: int
    activations_checkpointed: int
    forward_flops: float


def sample_cost(preset: Preset, frames: int, dtype: torch.dtype) -> SampleCost:
    """Extrapolated from 1- and 2-layer meta forwards to ``preset.dit.num_layers``; with
    checkpointing every block keeps its input and one block's activations are alive at a time (its
    recomputation in backward)."""
    layers = preset.dit.num_layers
    (one, f1), (two, f2) = (_forward_cost(preset, n, frames, dtype, False) for n in (1, 2))
    (one_ac, _), (two_ac, _) = (_forward_cost(preset, n, frames, dtype, True) for n in (1, 2))
    per_layer, per_layer_ac = two - one, two_ac - one_ac
    outside, outside_ac = one - per_layer, one_ac - per_layer_ac
    return SampleCost(activations=outside + layers * per_layer,
                      activations_checkpointed=outside_ac + layers * per_layer_ac + per_layer,
                      forward_flops=(f1 - (f2 - f1)) + layers * (f2 - f1))


# ------------------------------------------------------------------------------ the plan
def _frames(recipe: Recipe) -> tuple[int, int, int]:
    """(frames of the graph held for the trained network's backward, critic windows, window
    frames)."""
    kind, data, dmd = recipe.objective.kind, recipe.data, recipe.dmd
    if kind == "dmd":
        fpb = recipe.build_preset().cache.frames_per_block
        frames = dmd.rollout_blocks * fpb
        stride = dmd.teacher_frames - dmd.window_overlap_frames
        windows = (frames - dmd.teacher_frames) // stride + 1
        return dmd.grad_last_frames or frames, windows, dmd.teacher_frames
    # [clean ; noisy] sequences for the causal kinds and the memory model; plain clips for the
    # teacher.
    return (data.clip_frames if kind == "teacher_fm" else 2 * data.clip_frames), 0, 0


def plan_training(recipe: Recipe, gpus: int, nodes: int = 1) -> TrainingPlan:
    """Per-GPU memory and step FLOPs of ``recipe`` on ``gpus`` GPUs per node times ``nodes``."""
    preset = recipe.build_preset()
    world = gpus * nodes
    replicate, shard = mesh_shape(world, recipe.parallel.shard_size)
    DistributedContext(world_size=world).batch_slice(
        recipe.loop.batch_size // recipe.loop.grad_accum
    )
    dtype = PARAM_DTYPES[recipe.parallel.mixed_precision]
    model = meta_model(preset.dit)
    numel, per_rank = sum(p.numel() for p in model.parameters()), sharded_numel(model, shard)
    tensors = len(list(model.parameters()))
    nets = networks_of(recipe)
    trained = sum(net.trainable for net in nets)
    units = _units(model)
    gathered = 0
    if shard > 1 or dtype != torch.float32:
        # FSDP materialises unsharded units in the compute dtype: two units' parameters in flight,
        # one unit's unsharded gradients before the reduce-scatter, and the root (kept after
        # forward).
        largest = max(units[:-1])
        gathered = ((UNITS_IN_FLIGHT + 1) * largest + units[-1]) * (torch.finfo(dtype).bits // 8)

    frames, windows, window_frames = _frames(recipe)
    cost = sample_cost(preset, frames, dtype)
    if windows:  # a rollout's exit steps also keep the cached K/V they attended to
        cached = _cached_kv_bytes(recipe, preset, frames, dtype)
        cost = dataclasses.replace(cost, activations=cost.activations + cached,
                                   activations_checkpointed=cost.activations_checkpointed + cached)
    samples = recipe.loop.batch_size / recipe.loop.grad_accum / world
    acts, acts_ac = cost.activations, cost.activations_checkpointed
    flops_per_sample = (BACKWARD_FORWARDS + 1) * cost.forward_flops
    if windows:
        critic = sample_cost(preset, window_frames, dtype)
        acts = max(acts, windows * critic.activations)
        acts_ac = max(acts_ac, windows * critic.activations_checkpointed)
        flops_per_sample = _dmd_flops(recipe, preset, critic, windows)
    elif recipe.parallel.activation_checkpointing:
        flops_per_sample += cost.forward_flops  # the recomputed forward
    return TrainingPlan(
        recipe=recipe.name, world=world, nodes=nodes, replicate=replicate, shard=shard,
        mixed_precision=recipe.parallel.mixed_precision,
        networks=tuple((net.name, numel, net.trainable) for net in nets),
        params_bytes=len(nets) * per_rank * MASTER_BYTES,
        grads_bytes=trained * per_rank * MASTER_BYTES,
        optimizer_bytes=trained * (ADAM_MOMENTS * per_rank + tensors) * MASTER_BYTES,
        ema_bytes=sum(net.ema for net in nets) * per_rank * MASTER_BYTES,
        gathered_bytes=gathered,
        activations_bytes=math.ceil(samples * acts),
        activations_checkpointed_bytes=math.ceil(samples * acts_ac),
        samples_per_gpu=samples,
        step_flops_per_gpu=recipe.loop.batch_size / world * flops_per_sample)


def _dmd_flops(recipe: Recipe, preset: Preset, critic: SampleCost, windows: int) -> float:
    """FLOPs of one sample per optimiser step of DMD, per-token forward cost times tokens:

    every step, the critic: a no-grad rollout (on average (K+1)/2 denoising forwards per block + the
    write pass) and forward + backward over its windows; every n-th step, the generator: a rollout
    whose exit forwards with gradient are also backpropagated (and recomputed under checkpointing),
    the teacher with CFG (2 forwards) and the critic (1 forward) on each window. The history loss's
    second rollout is not counted.
    """
    dmd = recipe.dmd
    frames = dmd.rollout_blocks * preset.cache.frames_per_block
    grad_frames = dmd.grad_last_frames or frames
    steps = len(preset.scheduler.denoising_steps)
    # Per frame of a teacher window (block-local attention is cheaper; this over-counts it a
    # little).
    per_frame = critic.forward_flops / dmd.teacher_frames
    rollout = ((steps + 1) / 2 + 1) * frames * per_frame
    critic_step = rollout + (BACKWARD_FORWARDS + 1) * windows * critic.forward_flops
    recompute = 1 if recipe.parallel.activation_checkpointing else 0
    generator_step = (rollout + (BACKWARD_FORWARDS + recompute) * grad_frames * per_frame
                      + 3 * windows * critic.forward_flops)
    return critic_step + generator_step / dmd.critic_steps_per_generator_step


def _cached_kv_bytes(recipe: Recipe, preset: Preset, grad_frames: int, dtype: torch.dtype) -> int:
    """K/V of the cache that every exit step with gradient attends to (kept for its backward): all
    earlier frames under ``full``, at most the sinks and memory slots under ``mag`` /
    ``downsample``."""
    fpb, cache = preset.cache.frames_per_block, preset.cache
    frames = recipe.dmd.rollout_blocks * fpb
    cap = frames if recipe.dmd.rollout_policy == "full" else cache.sink_frames + cache.memory_slots
    # K and V
    per_frame = preset.tokens_per_frame * preset.dit.dim * 2 * (torch.finfo(dtype).bits // 8)
    starts = range(frames - grad_frames, frames, fpb)
    return sum(min(start, cap) for start in starts) * per_frame * preset.dit.num_layers
