"""Training stages: what one optimiser step computes for each objective kind of a recipe.

The chain of DESIGN §1 at any scale:

- ``teacher_fm`` -- the bidirectional teacher, flow matching on world clips;
- causal initialisation of the student, either ``causal_fm`` (teacher-forced causal flow matching on
  data, CausVid-style) or ``ode`` (regression onto the teacher's ODE trajectories, Self-Forcing-style;
  pairs written by ``mag train ode-pairs``);
- ``dmd`` -- Self-Forcing DMD: the student rolls out autoregressively, the frozen teacher (real score,
  CFG) and a trained critic (fake score) score it; with ``dmd.rollout_policy = "mag"`` this is MAG's
  stage 2: the frozen memory model writes the rollout's compressed cache, the generator only reads it;
- ``memory`` -- the stage-1 memory model (initialised from the generator, own weights): reconstruct
  whole blocks from their compressed last frames, with the empty prompt.

:class:`FlowMatchingStage`, :class:`ODEStage` and :class:`MemoryStage` produce one loss per
micro-batch; the trainer owns the optimiser loop around them. :class:`DMDStage` owns its own step,
because it updates two networks on a schedule: the critic every optimiser step, the generator every
``dmd.critic_steps_per_generator_step``-th (:class:`~mag.objectives.dmd.DMDUpdateSchedule`; generator
first, then the critic on a fresh rollout of the updated generator, as Self-Forcing does).

Every random draw comes from a generator keyed by ``(seed, step, micro, index, role)``
(:func:`draw_generator`): per sample for noise and timesteps, and ``index = 0`` of a shared role for
what all samples of a micro-batch share (the DMD exit step, the history choice, the memory stage's
first RoPE position). Nothing random lives outside the checkpointed step, so resuming is exact and
data-parallel ranks draw the single-process batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mag.cache import CachePolicy
from mag.config import Preset, config_differences
from mag.errors import CheckpointError, ConfigError, InputError
from mag.memory import (
    load_memory_model,
    memory_model_mismatch,
    sample_memory_timesteps,
    sample_start_position,
)
from mag.models import WanDiT
from mag.objectives.dmd import (
    DMDUpdateSchedule,
    combine,
    dmd_generator_loss,
    draw_history_choice,
    history_block_contexts,
    score_windows,
)
from mag.objectives.flow_matching import (
    LossOutput,
    apply_cfg_dropout,
    causal_flow_matching_loss,
    teacher_flow_matching_loss,
)
from mag.objectives.memory import memory_reconstruction_loss
from mag.objectives.ode import (
    ODEPairs,
    few_step_indices,
    load_ode_pairs,
    ode_regression_loss,
    sample_ode_trajectory,
)
from mag.pipelines.rollout import BlockContexts, draw_exit_step, draw_rollout_noise, self_forcing_rollout
from mag.pipelines.streaming import policy_from_name, writer_for
from mag.schedulers import FlowMatchScheduler
from mag.text import PromptEmbeddingCache, get_text_encoder
from mag.train.checkpoint import flatten_optimizer_state, unflatten_optimizer_state
from mag.train.data import WorldClipSource
from mag.train.distributed import DistributedContext
from mag.train.ema import EMA
from mag.train.parallelize import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
)
from mag.train.recall import view_categories
from mag.train.recipe import Recipe

Parallelize = Callable[[nn.Module], nn.Module]

# Roles of :func:`draw_generator`: independent streams for the same (seed, step, micro, index).
ROLE_SAMPLE = 0            # supervised objectives; also what sample_generator draws (4-key form)
ROLE_GENERATOR = 1         # DMD generator step: rollout noise, DMD timesteps and noise
ROLE_CRITIC = 2            # DMD critic step: rollout noise, critic timesteps and noise
ROLE_HISTORY = 3           # DMD history rollout's draws
ROLE_SHARED_GENERATOR = 4  # index 0: exit step and history choice of a generator micro-batch
ROLE_SHARED_CRITIC = 5     # index 0: exit step of a critic micro-batch
ROLE_SHARED_MEMORY = 6     # index 0: first RoPE position of a memory micro-batch
# Checkpoint keys of the DMD stage's own state (inside the checkpoint's ``extra.`` section).
CRITIC_MODEL_PREFIX, CRITIC_OPTIM_PREFIX = "critic.model.", "critic."
CRITIC_OPTIM_METADATA = "critic_optimizer"
# Checkpoint metadata key of the memory model a ``mag`` rollout ran with (source, name, weights digest).
MEMORY_MODEL_METADATA = "memory_model"


def sample_generator(seed: int, step: int, micro: int, index: int) -> torch.Generator:
    """The CPU generator of one sample of one micro-batch: draws depend on nothing else, so resuming,
    or splitting the batch across data-parallel ranks, reproduces them exactly."""
    state = np.random.SeedSequence([seed, step, micro, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def draw_generator(seed: int, step: int, micro: int, index: int, role: int) -> torch.Generator:
    """Like :func:`sample_generator`, one independent stream per ``role`` (``ROLE_*``)."""
    if role == ROLE_SAMPLE:
        return sample_generator(seed, step, micro, index)
    state = np.random.SeedSequence([seed, step, micro, index, role]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def build_model(recipe: Recipe, device: torch.device | str = "cpu", *, init: bool = True) -> WanDiT:
    """Build on the meta device, materialise on ``device``, initialise from the recipe seed, then load
    ``init.model`` when the recipe names one and ``init`` (a resumed run takes the checkpoint's)."""
    preset = recipe.build_preset()
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    model.to_empty(device=device)
    torch.manual_seed(recipe.loop.seed)
    model.init_weights()
    if init and recipe.init.model:
        load_init_weights(model, recipe.init.model, preset)
    return model


def load_init_weights(model: WanDiT, name_or_path: str, preset: Preset) -> None:
    """Copy the weights of a model file / checkpoint / registry name into ``model`` (same ``dit`` config)."""
    from mag.registry import load_model

    source, source_preset, _ = load_model(name_or_path)
    if source_preset.dit != preset.dit:
        differences = config_differences(preset.dit, source_preset.dit)
        raise CheckpointError(f"init.model {name_or_path!r} is a different network: its dit config differs"
                              f" from the recipe's ({differences}; recipe vs file)")
    with torch.no_grad():
        model.load_state_dict(source.state_dict())


@functools.lru_cache(maxsize=4)
def prompt_cache(encoder_name: str, mode: str) -> PromptEmbeddingCache:
    """One encoder + embedding cache per process: loading MiniLM takes seconds, prompts repeat."""
    return PromptEmbeddingCache(get_text_encoder(encoder_name, mode=mode))


@dataclass
class StageContext:
    """What every stage reads: the recipe, its preset and schedule, the data and text, the device."""

    recipe: Recipe
    preset: Preset
    scheduler: FlowMatchScheduler
    data: WorldClipSource
    text: PromptEmbeddingCache
    empty_context: Tensor
    device: torch.device

    def width_offsets(self, camera_px: Tensor) -> Tensor | None:
        """Camera track ``[B, F]`` in pixels -> width positions in patches (camera-anchored presets only)."""
        if not self.preset.dit.camera_rope:
            return None
        return (camera_px / self.preset.dit.patch_size[2]).to(self.device)

    def categories(self, offsets: Tensor) -> Tensor:
        """Recall-signal categories ``[B, F, W]`` of the frames of clips with camera ``offsets: [B, F]``."""
        world = self.data.world
        return view_categories(offsets, world.frame_width, world.pano_width,
                               self.preset.cache.frames_per_block,
                               self.recipe.objective.recall_window_frames).to(self.device)


# ------------------------------------------------------------------------------ supervised stages
@dataclass
class SampleDraws:
    """Random draws of a micro-batch: ``noise`` like the clips, ``timestep`` ``[B]`` (teacher) or
    ``[B, blocks]`` (causal), ``drop_text`` ``[B]`` bool (CFG dropout)."""

    noise: Tensor
    timestep: Tensor
    drop_text: Tensor


class FlowMatchingStage:
    """``teacher_fm`` / ``causal_fm``: flow matching on world clips (one loss per micro-batch)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.causal = ctx.recipe.objective.kind == "causal_fm"
        data = ctx.recipe.data
        self.tokens_per_sample = data.clip_frames * ctx.preset.tokens_per_frame * (2 if self.causal else 1)

    def _draws(self, step: int, micro: int, indices: range, clip_shape: tuple[int, ...]) -> SampleDraws:
        ctx = self.ctx
        per_sample_t = (1, clip_shape[0] // ctx.preset.cache.frames_per_block) if self.causal else (1,)
        noise, timestep, drop = [], [], []
        for i in indices:
            gen = sample_generator(ctx.recipe.loop.seed, step, micro, i)
            timestep.append(ctx.scheduler.sample_training_timesteps(per_sample_t, generator=gen))
            drop.append(torch.rand(1, generator=gen) < ctx.recipe.objective.cfg_dropout)
            noise.append(torch.randn(clip_shape, generator=gen))
        return SampleDraws(torch.stack(noise), torch.cat(timestep), torch.cat(drop))

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput, Tensor]:
        """The loss of this rank's samples of one micro-batch, and their recall categories ``[B, F, W]``."""
        ctx = self.ctx
        batch = ctx.data.batch(step, micro, indices)
        draws = self._draws(step, micro, indices, tuple(batch.video.shape[1:]))
        video, noise = batch.video.to(ctx.device), draws.noise.to(ctx.device)
        context = apply_cfg_dropout(ctx.text.get(batch.prompts).to(ctx.device), ctx.empty_context,
                                    draws.drop_text.to(ctx.device))
        timestep = draws.timestep.to(ctx.device)
        offsets = ctx.width_offsets(batch.camera_px)
        if self.causal:
            out = causal_flow_matching_loss(model, ctx.scheduler, video, context,
                                            ctx.preset.cache.frames_per_block, noise, timestep, offsets)
        else:
            out = teacher_flow_matching_loss(model, ctx.scheduler, video, context, noise, timestep, offsets)
        return out, ctx.categories(batch.offsets)


class ODEStage:
    """``ode``: the causal student regresses the teacher's ODE endpoint (pairs from ``ode.pairs``).

    Each sample draws a clip of the file and one few-step level per block (uniform), from its own
    keyed generator.
    """

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.pairs = load_ode_pairs(ctx.recipe.ode.pairs)
        frames = self.pairs.x0.shape[1]
        fpb = ctx.preset.cache.frames_per_block
        expected = ctx.scheduler.few_step_timesteps()
        if self.pairs.timesteps.shape != expected.shape or not torch.allclose(self.pairs.timesteps, expected):
            raise ConfigError(f"{ctx.recipe.ode.pairs} holds levels {self.pairs.timesteps.tolist()}, but the"
                              f" recipe's scheduler steps through {expected.tolist()}; regenerate the pairs")
        if frames % fpb:
            raise ConfigError(f"{ctx.recipe.ode.pairs} holds {frames}-frame clips, not a multiple of the"
                              f" block size {fpb}")
        if ctx.preset.dit.camera_rope and self.pairs.camera_px is None:
            raise ConfigError(f"{ctx.recipe.ode.pairs} has no camera tracks, which the camera-anchored"
                              " preset (dit.camera_rope) needs; regenerate it with a camera-anchored teacher")
        self.num_blocks = frames // fpb
        self.tokens_per_sample = 2 * frames * ctx.preset.tokens_per_frame

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput, Tensor]:
        ctx, pairs = self.ctx, self.pairs
        levels = pairs.timesteps.shape[0]
        clip, level = [], []
        for i in indices:
            gen = sample_generator(ctx.recipe.loop.seed, step, micro, i)
            clip.append(torch.randint(len(pairs), (1,), generator=gen))
            level.append(torch.randint(levels, (1, self.num_blocks), generator=gen))
        chosen = torch.cat(clip)
        camera = None if pairs.camera_px is None else ctx.width_offsets(pairs.camera_px[chosen])
        out = ode_regression_loss(model, ctx.scheduler, pairs.trajectory[chosen].to(ctx.device),
                                  pairs.x0[chosen].to(ctx.device), pairs.context[chosen].to(ctx.device),
                                  ctx.preset.cache.frames_per_block, torch.cat(level).to(ctx.device), camera)
        return out, ctx.categories(pairs.offsets[chosen])


@dataclass
class MemoryDraws:
    """Random draws of a memory micro-batch: ``noise`` like the clips ``[B, N, C, H, W]``, ``timestep``
    ``[B, N / F]`` (few-step levels, one per block) and the shared first RoPE position."""

    noise: Tensor
    timestep: Tensor
    start_position: int


class MemoryStage:
    """``memory``: the stage-1 memory model rebuilds whole clips from their compressed memory.

    One parallel pass over ``[clean ; noisy]`` of each clip under :func:`mag.memory.memory_training_mask`
    with the empty prompt (``""`` of the prompt cache; ``objective.cfg_dropout`` does not apply), x0-MSE
    on the noisy half (:func:`mag.objectives.memory.memory_reconstruction_loss`). Each sample draws, from
    its own keyed stream, one few-step level per block and then its noise; the first RoPE position (a
    multiple of the block size, the clip inside ``dit.rope_max_positions``) is one per micro-batch, from
    index 0 of ``ROLE_SHARED_MEMORY``, since the parallel pass takes one. Camera-anchored presets get the
    clips' camera tracks. Recall-signal categories are logged as for flow matching: ``recall`` pixels are
    views last seen more than ``recall_window_frames`` earlier, which only earlier blocks' retained
    frames can bring back.
    """

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        frames = ctx.recipe.data.clip_frames
        self.num_blocks = frames // ctx.preset.cache.frames_per_block
        self.tokens_per_sample = 2 * frames * ctx.preset.tokens_per_frame
        if not ctx.recipe.init.model:
            warnings.warn(f"recipe {ctx.recipe.name!r} trains a memory model without init.model: it starts"
                          " from random weights, not from the generator whose blocks it will compress"
                          " (DESIGN §1); set init.model to the generator's model file or registry name",
                          UserWarning, stacklevel=2)

    def draws(self, step: int, micro: int, indices: range, clip_shape: tuple[int, ...]) -> MemoryDraws:
        """The draws of samples ``indices`` of one micro-batch of clips ``clip_shape = (N, C, H, W)``."""
        ctx = self.ctx
        seed = ctx.recipe.loop.seed
        noise, timestep = [], []
        for i in indices:
            gen = draw_generator(seed, step, micro, i, ROLE_SAMPLE)
            timestep.append(sample_memory_timesteps(ctx.scheduler, 1, self.num_blocks, generator=gen))
            noise.append(torch.randn(clip_shape, generator=gen))
        start = sample_start_position(clip_shape[0], ctx.preset.cache.frames_per_block,
                                      ctx.preset.dit.rope_max_positions,
                                      generator=draw_generator(seed, step, micro, 0, ROLE_SHARED_MEMORY))
        return MemoryDraws(torch.stack(noise), torch.cat(timestep), start)

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput, Tensor]:
        """The reconstruction loss of this rank's samples of one micro-batch, and their recall categories
        ``[B, N, W]``."""
        ctx = self.ctx
        batch = ctx.data.batch(step, micro, indices)
        draws = self.draws(step, micro, indices, tuple(batch.video.shape[1:]))
        out = memory_reconstruction_loss(model, ctx.scheduler, batch.video.to(ctx.device), ctx.empty_context,
                                         draws.noise.to(ctx.device), draws.timestep.to(ctx.device),
                                         draws.start_position, ctx.width_offsets(batch.camera_px))
        return out, ctx.categories(batch.offsets)


SupervisedStage = FlowMatchingStage | ODEStage | MemoryStage


# ------------------------------------------------------------------------------ DMD
@dataclass
class _Clips:
    """Prompts and camera tracks of one micro-batch, on the device."""

    context: Tensor         # [B, L, text_dim]
    uncond: Tensor          # [B, L, text_dim] the empty prompt
    width_offsets: Tensor | None  # [B, N] in patches (camera-anchored), rollout frames only


class DMDStage:
    """Self-Forcing DMD: generator (the trainer's model), critic (trained here), teacher (frozen).

    The teacher is loaded with :func:`mag.registry.load_model` (eval, no gradient, never sharded); the
    critic starts from ``dmd.critic`` or a copy of the teacher, is sharded like the generator and has
    its own AdamW (``dmd.critic_lr``, ``dmd.critic_betas``; ``optim.weight_decay``, ``optim.grad_clip``
    and the warm-up are shared).

    Every rollout (generator, history, critic) runs under ``dmd.rollout_policy``: ``full`` keeps every
    frame (Self-Forcing); ``mag`` is MAG stage 2 (DESIGN §1): after each block the frozen memory model
    (``dmd.memory_model``: a ``memory`` file whose ``dit`` config equals the generator's; loaded once,
    eval, no gradient, never sharded) runs the clean block at t=0 with the empty prompt and writes the
    compressed K/V (sinks + each block's last frame), which the generator only reads; ``downsample``
    keeps the same frames but the generator writes them (the "w/o stage 1" ablation). Rollouts may be
    longer than the teacher: they are scored window by window (``dmd.teacher_frames``), and the history
    loss generates every window after the first with the empty text under the same policy.

    Gradient reaches the generator through each block's exit step; ``dmd.grad_last_frames > 0`` keeps it
    only for blocks in the last frames (earlier chunks are generated, and shape the cache, without
    gradient) and skips scoring the windows that hold none of them.
    """

    def __init__(self, ctx: StageContext, generator: nn.Module, dist: DistributedContext,
                 parallelize: Parallelize | None = None) -> None:
        from mag.registry import GENERATOR_STAGES, load_model

        self.ctx = ctx
        recipe, preset = ctx.recipe, ctx.preset
        self.dmd = recipe.dmd
        self.config = recipe.dmd.step_config(preset)
        self.schedule = DMDUpdateSchedule.from_config(self.config)
        self.generator = generator
        self.dist = dist
        # Teacher and critic are score networks: any generator stage, never a memory model.
        teacher = load_model(self.dmd.teacher, ctx.device, expect_stage=GENERATOR_STAGES)[0]
        self.teacher = self._check(teacher, "dmd.teacher", self.dmd.teacher)
        self.teacher.requires_grad_(False)
        critic_source = self.dmd.critic or self.dmd.teacher
        critic = load_model(critic_source, ctx.device, expect_stage=GENERATOR_STAGES)[0]
        critic = self._check(critic, "dmd.critic", critic_source).train()
        self.critic = parallelize(critic) if parallelize is not None else critic
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=self.dmd.critic_lr, betas=self.dmd.critic_betas,
            weight_decay=recipe.optim.weight_decay)
        self.memory_model, self.memory_record = self._load_memory_model()
        self.policy: CachePolicy = policy_from_name(self.dmd.rollout_policy, preset)
        self.writer = writer_for(self.policy, memory_model=self.memory_model, empty_context=ctx.empty_context)
        # Camera tracks go to whichever of the three networks is camera-anchored (each gets its own
        # frames' positions; a plain network gets none).
        self.camera_anchored = any(_camera_anchored(m) for m in (generator, self.teacher, self.critic))
        fpb = preset.cache.frames_per_block
        self.frames_per_block = fpb
        self.num_frames = self.dmd.rollout_blocks * fpb
        self.frame_shape = (preset.dit.in_channels, preset.video.latent_height, preset.video.latent_width)
        self.num_steps = len(preset.scheduler.denoising_steps)
        windows = score_windows(torch.zeros(1, self.num_frames), self.dmd.teacher_frames,
                                self.dmd.window_overlap_frames)
        self.num_windows = windows.shape[0]
        # Windows holding a frame with gradient (all unless dmd.grad_last_frames): the ones DMD scores.
        first_grad_frame = self.num_frames - (self.dmd.grad_last_frames or self.num_frames)
        stride = self.dmd.teacher_frames - self.dmd.window_overlap_frames
        self.scored_windows = tuple(i for i in range(self.num_windows)
                                    if i * stride + self.dmd.teacher_frames > first_grad_frame)
        # Per sample: the rollout's forwards (up to K steps + the write pass), the scored windows (teacher
        # with CFG and critic) and the critic's training windows, in tokens.
        self.tokens_per_sample = preset.tokens_per_frame * (
            self.num_frames * (self.num_steps + 1)
            + (3 * len(self.scored_windows) + self.num_windows) * self.dmd.teacher_frames)

    def _load_memory_model(self) -> tuple[WanDiT | None, dict[str, str]]:
        """The frozen memory model of a ``mag`` rollout and its checkpoint record (None, {} otherwise).

        :func:`mag.memory.load_memory_model` refuses generator files (CheckpointError); a memory model of
        another network than the generator is a ConfigError.
        """
        if self.dmd.rollout_policy != "mag":
            return None, {}
        from mag.registry import model_stage

        source, preset = self.dmd.memory_model, self.ctx.preset
        memory, memory_preset, meta = load_memory_model(source, self.ctx.device)
        mismatch = memory_model_mismatch(preset, memory_preset, fields=("dit",))
        if mismatch is not None:
            raise ConfigError(f"dmd.memory_model {source!r} is a different network from the generator: its"
                              f" {mismatch} differs from the recipe's; train the memory model from this"
                              " generator (objective.kind = 'memory')")
        memory.requires_grad_(False)
        record = {"source": str(source), "name": str(meta.get("name", "")),
                  "stage": str(model_stage(meta)), "weights_sha256": _weights_digest(memory)}
        return memory, record

    def _check(self, model: WanDiT, field: str, source: str) -> WanDiT:
        cfg, dit = model.cfg, self.ctx.preset.dit
        ours = (dit.in_channels, dit.out_channels, dit.text_dim)
        if (cfg.in_channels, cfg.out_channels, cfg.text_dim) != ours:
            raise CheckpointError(
                f"{field} {source!r} has channels in/out {cfg.in_channels}/{cfg.out_channels} and text_dim"
                f" {cfg.text_dim}; the recipe's generator {dit.in_channels}/{dit.out_channels} and"
                f" {dit.text_dim}")
        return model

    # -------------------------------------------------------------------------- one step
    def train_step(self, step: int, optimizer: torch.optim.Optimizer, ema: EMA, lr_scale: float,
                   indices: range) -> dict[str, Tensor]:
        """One optimiser step: maybe the generator (schedule), then the critic; device tensors.

        ``stats``: ``loss`` / ``grad_norm`` the critic's; ``generator_loss``, ``generator_grad_norm``,
        ``dmd_gradient_abs`` (mean |g|) NaN on critic-only steps; ``generator_updated`` 0 or 1.
        """
        recipe, device = self.ctx.recipe, self.ctx.device
        accum = recipe.loop.grad_accum
        nan = torch.full((), float("nan"), device=device)
        stats = {"generator_loss": nan, "generator_grad_norm": nan, "dmd_gradient_abs": nan,
                 "generator_updated": torch.zeros((), device=device)}
        if self.schedule.generator_updates(step):
            for group in optimizer.param_groups:
                group["lr"] = recipe.optim.lr * lr_scale
            optimizer.zero_grad(set_to_none=True)
            total, g_abs = torch.zeros((), device=device), torch.zeros((), device=device)
            for micro in range(accum):
                loss, gradient_abs = self._generator_loss(step, micro, indices)
                (loss / accum).backward()
                total += loss.detach() / accum
                g_abs += gradient_abs / accum
            grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), recipe.optim.grad_clip)
            optimizer.step()
            ema.update(self.generator, step)
            stats.update(generator_loss=total, generator_grad_norm=grad_norm, dmd_gradient_abs=g_abs,
                         generator_updated=torch.ones((), device=device))
        for group in self.critic_optimizer.param_groups:
            group["lr"] = self.dmd.critic_lr * lr_scale
        self.critic_optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(accum):
            loss = self._critic_loss(step, micro, indices)
            (loss / accum).backward()
            total += loss.detach() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), recipe.optim.grad_clip)
        self.critic_optimizer.step()
        return {"loss": total, "grad_norm": grad_norm, **stats}

    def _clips(self, step: int, micro: int, indices: range) -> _Clips:
        ctx = self.ctx
        batch = ctx.data.batch(step, micro, indices)
        context = ctx.text.get(batch.prompts).to(ctx.device)
        camera = batch.camera_px[:, :self.num_frames]
        offsets = (camera / ctx.preset.dit.patch_size[2]).to(ctx.device) if self.camera_anchored else None
        return _Clips(context, ctx.empty_context.expand_as(context), offsets)

    def _rollout(self, clips: _Clips, exit_step: int, noise_draws: Tensor, *, grad: bool,
                 context_per_block: BlockContexts | None = None) -> Tensor:
        """The student's autoregressive sample ``[B, N, C, H, W]`` (gradient through the exit step)."""
        model = self.generator
        return self_forcing_rollout(
            model, self.ctx.scheduler, clips.context, num_blocks=self.dmd.rollout_blocks,
            frames_per_block=self.frames_per_block, frame_shape=self.frame_shape, policy=self.policy,
            writer=self.writer, exit_step=exit_step, noise_draws=noise_draws.to(self.ctx.device), grad=grad,
            context_per_block=context_per_block, grad_last_frames=self.dmd.grad_last_frames or None,
            width_offsets=_for(model, clips.width_offsets))

    def _sample_draws(self, step: int, micro: int, indices: range, role: int,
                      windows: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample, from its own stream: rollout noise ``[K, B, N, C, H, W]``, scoring timesteps
        ``[windows, B]`` and scoring noise ``[windows, B, Fw, C, H, W]``."""
        rollout, t, noise = [], [], []
        window_shape = (windows, 1, self.dmd.teacher_frames, *self.frame_shape)
        for i in indices:
            gen = draw_generator(self.ctx.recipe.loop.seed, step, micro, i, role)
            rollout.append(draw_rollout_noise(1, self.dmd.rollout_blocks, self.frames_per_block,
                                              self.frame_shape, self.num_steps, gen))
            t.append(self.config.draw_timesteps(self.ctx.scheduler, windows, gen)[:, None])
            noise.append(torch.randn(window_shape, generator=gen))
        device = self.ctx.device
        return torch.cat(rollout, 1), torch.cat(t, 1).to(device), torch.cat(noise, 1).to(device)

    def _windows(self, x: Tensor, offsets: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
        """Teacher windows of a rollout ``[W, B, Fw, ...]`` and of its camera track (``[B, Fw]`` each)."""
        windows = score_windows(x, self.dmd.teacher_frames, self.dmd.window_overlap_frames)
        if offsets is None:
            return windows, [None] * windows.shape[0]
        return windows, list(score_windows(offsets, self.dmd.teacher_frames, self.dmd.window_overlap_frames))

    def _scored_dmd_loss(self, x: Tensor, clips: _Clips, t: Tensor, noise: Tensor,
                         first_window: int = 0) -> tuple[Tensor, Tensor]:
        """:meth:`_dmd_loss` on the windows from ``first_window`` on that carry gradient
        (``self.scored_windows``); ``t: [W', B]`` and ``noise: [W', B, Fw, ...]`` hold one draw per window
        from ``first_window`` on (scored or not, so the draws do not depend on ``dmd.grad_last_frames``)."""
        windows, offsets = self._windows(x, clips.width_offsets)
        chosen = [i for i in self.scored_windows if i >= first_window]
        draws = [i - first_window for i in chosen]
        return self._dmd_loss(windows[chosen], [offsets[i] for i in chosen], t[draws], noise[draws], clips)

    def _dmd_loss(self, windows: Tensor, offsets: list[Tensor | None], t: Tensor, noise: Tensor,
                  clips: _Clips) -> tuple[Tensor, Tensor]:
        """``L_DMD`` averaged over windows (each window its own clip with its own camera track), and mean
        |g|. Equal-size windows make this the loss of ``dmd_generator_loss(..., window_frames=Fw)``."""
        losses, g_abs = [], []
        for window, window_offsets, t_w, noise_w in zip(windows, offsets, t, noise, strict=True):
            out = dmd_generator_loss(
                window, _x0_score(self.teacher, self.ctx.scheduler, window_offsets),
                _x0_score(self.critic, self.ctx.scheduler, window_offsets), self.ctx.scheduler, t_w, noise_w,
                context=clips.context, uncond_context=clips.uncond, guidance_scale=self.config.guidance_scale)
            losses.append(out.loss)
            g_abs.append(out.gradient.abs().mean())
        return torch.stack(losses).mean(), torch.stack(g_abs).mean()

    def _generator_loss(self, step: int, micro: int, indices: range) -> tuple[Tensor, Tensor]:
        """``(1-λ) L_DMD + λ L_history`` (or one of them, by λ's mode) on one micro-batch, and mean |g|."""
        seed, lam, mode = self.ctx.recipe.loop.seed, self.config.history_lambda, self.config.history_mode
        shared = draw_generator(seed, step, micro, 0, ROLE_SHARED_GENERATOR)
        exit_step = draw_exit_step(self.num_steps, shared)
        use_history = draw_history_choice(lam, shared) if lam > 0 and mode == "probability" else None
        clips = self._clips(step, micro, indices)
        l_dmd = l_hist = None
        g_abs = []
        if lam == 0 or mode == "weight" or not use_history:
            noise_draws, t, noise = self._sample_draws(step, micro, indices, ROLE_GENERATOR, self.num_windows)
            x = self._rollout(clips, exit_step, noise_draws, grad=True)
            l_dmd, g = self._scored_dmd_loss(x, clips, t, noise)
            g_abs.append(g)
        if lam > 0 and (mode == "weight" or use_history):
            l_hist, g = self._history_loss(step, micro, indices, clips, exit_step)
            g_abs.append(g)
        loss = l_dmd if lam == 0 else combine(l_dmd, l_hist, lam, mode, use_history)
        return loss, torch.stack(g_abs).mean()

    def _history_loss(self, step: int, micro: int, indices: range, clips: _Clips,
                      exit_step: int) -> tuple[Tensor, Tensor]:
        """MAG's ``L_history`` (:func:`mag.objectives.dmd.history_loss`, window by window so each keeps
        its camera track): chunks after the first generated with the empty text, scored with the real."""
        noise_draws, t, noise = self._sample_draws(step, micro, indices, ROLE_HISTORY, self.num_windows - 1)
        contexts = history_block_contexts(clips.context, clips.uncond, frames_per_block=self.frames_per_block,
                                          first_chunk_frames=self.dmd.teacher_frames)
        x = self._rollout(clips, exit_step, noise_draws, grad=True, context_per_block=contexts)
        return self._scored_dmd_loss(x, clips, t, noise, first_window=1)

    def _critic_loss(self, step: int, micro: int, indices: range) -> Tensor:
        """Flow matching of the critic on a fresh no-grad rollout, window by window (mean over windows)."""
        shared = draw_generator(self.ctx.recipe.loop.seed, step, micro, 0, ROLE_SHARED_CRITIC)
        exit_step = draw_exit_step(self.num_steps, shared)
        clips = self._clips(step, micro, indices)
        noise_draws, t, noise = self._sample_draws(step, micro, indices, ROLE_CRITIC, self.num_windows)
        x = self._rollout(clips, exit_step, noise_draws, grad=False)
        windows, offsets = self._windows(x.detach(), clips.width_offsets)
        losses = [teacher_flow_matching_loss(self.critic, self.ctx.scheduler, window, clips.context, noise_w,
                                             t_w, _for(self.critic, window_offsets)).loss
                  for window, window_offsets, t_w, noise_w in zip(windows, offsets, t, noise, strict=True)]
        return torch.stack(losses).mean()

    # -------------------------------------------------------------------------- checkpoint
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The critic's weights and optimiser as checkpoint ``extra`` tensors + metadata (full tensors;
        under FSDP a collective, with the tensors on the main rank)."""
        if is_sharded(self.critic):
            weights = full_model_state(self.critic)
            optim = full_optimizer_state(self.critic, self.critic_optimizer)
        else:
            weights, optim = self.critic.state_dict(), self.critic_optimizer.state_dict()
        memory = {MEMORY_MODEL_METADATA: self.memory_record} if self.memory_record else {}
        if not optim:
            return {}, memory
        optim_tensors, skeleton = flatten_optimizer_state(optim)
        extra = {CRITIC_MODEL_PREFIX + k: v for k, v in weights.items()}
        extra.update({CRITIC_OPTIM_PREFIX + k: v for k, v in optim_tensors.items()})
        return extra, {CRITIC_OPTIM_METADATA: skeleton, **memory}

    def load_state(self, extra: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Restore the critic; refuse a memory model whose weights differ from the checkpoint's run."""
        stored = metadata.get(MEMORY_MODEL_METADATA)
        if isinstance(stored, dict) and self.memory_record and (
                stored.get("weights_sha256") != self.memory_record["weights_sha256"]):
            raise CheckpointError(f"dmd.memory_model {self.memory_record['source']!r} has other weights than"
                                  f" the memory model this run started with ({stored.get('source')!r});"
                                  " resume with the same memory model file, or start a new run")
        skeleton = metadata.get(CRITIC_OPTIM_METADATA)
        weights = {k[len(CRITIC_MODEL_PREFIX):]: v for k, v in extra.items()
                   if k.startswith(CRITIC_MODEL_PREFIX)}
        if not weights or not isinstance(skeleton, dict):
            raise CheckpointError("the checkpoint holds no critic state; it was not written by a dmd run")
        optim = unflatten_optimizer_state({k[len(CRITIC_OPTIM_PREFIX):]: v for k, v in extra.items()
                                      if k.startswith(CRITIC_OPTIM_PREFIX)
                                      and not k.startswith(CRITIC_MODEL_PREFIX)}, skeleton)
        if is_sharded(self.critic):
            load_full_model_state(self.critic, weights)
            load_full_optimizer_state(self.critic, self.critic_optimizer, optim)
            return
        missing, unexpected = self.critic.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"the checkpoint's critic does not fit dmd.critic: missing {missing[:5]},"
                                  f" unexpected {unexpected[:5]}")
        self.critic_optimizer.load_state_dict(optim)


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, bytes), in name order: names the
    exact weights a run used, whatever file or registry name they came from."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _camera_anchored(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and cfg.camera_rope)


def _for(model: nn.Module, width_offsets: Tensor | None) -> Tensor | None:
    """Camera positions for ``model`` if it is camera-anchored, else None (it refuses them)."""
    return width_offsets if _camera_anchored(model) else None


def _x0_score(model: nn.Module, scheduler: FlowMatchScheduler,
              width_offsets: Tensor | None) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """A DMD score ``(x_t, t, context) -> x0`` of a bidirectional model on one window (positions 0..Fw-1),
    with the window's camera track when the model is camera-anchored."""
    offsets = _for(model, width_offsets)

    def predict(x_t: Tensor, t: Tensor, context: Any) -> Tensor:
        return scheduler.to_x0(model(x_t, t, context, width_offsets=offsets), x_t, t)

    return predict


# ------------------------------------------------------------------------------ ODE pairs
def make_ode_pairs(teacher: str, num_clips: int, *, num_steps: int, guidance_scale: float, seed: int = 0,
                   frames: int | None = None, batch_size: int = 8, device: torch.device | str = "cpu",
                   progress: bool = True) -> ODEPairs:
    """Sample the teacher's guided ODE on the prompts (and camera tracks) of ``num_clips`` world clips.

    The world, text mode and clip length come from the teacher's training recipe (``frames`` overrides
    the length); clip ``i``'s prompt and its initial noise come from generators keyed by
    ``(seed, 0, 0, i)``, so a file is reproducible and its first clips do not depend on ``num_clips``.
    Returns pairs for :func:`mag.objectives.ode.save_ode_pairs` (see that module for the layout).
    """
    from tqdm.auto import tqdm

    from mag.registry import load_model
    from mag.train.recipe import recipe_from_dict

    model, preset, meta = load_model(teacher, device)
    if not isinstance(meta.get("recipe"), dict) or "name" not in meta["recipe"]:
        raise CheckpointError(f"teacher {teacher!r} carries no training recipe (it gives the world, text mode"
                              " and clip length of the pairs); export it from a training run")
    if num_clips < 1 or batch_size < 1:
        raise InputError(f"--clips and the batch size must be >= 1, got {num_clips} and {batch_size}")
    data = recipe_from_dict(meta["recipe"]).data
    if frames is not None:
        data = dataclasses.replace(data, clip_frames=frames)
    data.validate(preset.cache.frames_per_block)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    few_step_indices(scheduler, num_steps)  # refuse a step count off the few-step levels before sampling
    source = WorldClipSource(preset, data, seed)
    text = prompt_cache(preset.text_encoder, data.text_mode)
    empty = text.get([""]).to(device)
    frame_shape = (preset.dit.in_channels, preset.video.latent_height, preset.video.latent_width)
    parts: dict[str, list[Tensor]] = {name: [] for name in ("trajectory", "x0", "context", "offsets",
                                                            "camera_px")}
    prompts: list[str] = []
    starts = range(0, num_clips, batch_size)
    for start in tqdm(starts, desc="ode pairs", unit="batch", disable=not progress):
        indices = range(start, min(start + batch_size, num_clips))
        clips = source.batch(0, 0, indices)
        noise = torch.stack([torch.randn((data.clip_frames, *frame_shape),
                                         generator=sample_generator(seed, 0, 0, i)) for i in indices])
        context = text.get(clips.prompts).to(device)
        offsets = (clips.camera_px / preset.dit.patch_size[2]).to(device) if preset.dit.camera_rope else None
        trajectory, x0 = sample_ode_trajectory(model, scheduler, noise.to(device), context,
                                               empty.expand_as(context), num_steps,
                                               guidance_scale=guidance_scale, width_offsets=offsets)
        for name, value in (("trajectory", trajectory), ("x0", x0), ("context", context),
                            ("offsets", clips.offsets), ("camera_px", clips.camera_px)):
            parts[name].append(value.cpu())
        prompts.extend(clips.prompts)
    metadata = {"teacher": str(teacher), "preset": preset.to_dict(), "prompts": prompts, "steps": num_steps,
                "guidance_scale": guidance_scale, "seed": seed, "world": data.world,
                "text_mode": data.text_mode}
    return ODEPairs(trajectory=torch.cat(parts["trajectory"]), x0=torch.cat(parts["x0"]),
                    context=torch.cat(parts["context"]), timesteps=scheduler.few_step_timesteps(),
                    offsets=torch.cat(parts["offsets"]),
                    camera_px=torch.cat(parts["camera_px"]) if preset.dit.camera_rope else None,
                    metadata=metadata).validate()
