"""The ``dmd`` step runner: Self-Forcing DMD with a trained critic and a frozen teacher.

It owns its optimiser step because it updates two networks on a schedule (the critic every step, the
generator every ``dmd.critic_steps_per_generator_step``-th). With ``dmd.rollout_policy = "mag"``
this is MAG's stage 2: the frozen memory model writes the rollout's compressed cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mag.cache import CachePolicy
from mag.checkpoint import flatten_optimizer_state, unflatten_optimizer_state
from mag.errors import CheckpointError
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
    causal_flow_matching_loss,
    teacher_flow_matching_loss,
    teacher_forced_x0_score,
)
from mag.pipelines import policy_from_name, writer_for
from mag.pipelines.rollout import (
    BlockContexts,
    draw_exit_step,
    draw_rollout_noise,
    self_forcing_rollout,
)
from mag.registry import GENERATOR_STAGES
from mag.schedulers import FlowMatchScheduler
from mag.train.distributed import DistributedContext
from mag.train.ema import EMA
from mag.train.networks import load_network
from mag.train.parallelize import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
)
from mag.train.steps.base import (
    ROLE_CRITIC,
    ROLE_GENERATOR,
    ROLE_HISTORY,
    ROLE_SHARED_CRITIC,
    ROLE_SHARED_GENERATOR,
    Parallelize,
    StepContext,
    draw_generator,
    load_frozen_memory_model,
)

# Checkpoint keys of the DMD step's own state (inside the checkpoint's ``extra.`` section).
CRITIC_MODEL_PREFIX, CRITIC_OPTIM_PREFIX = "critic.model.", "critic."
CRITIC_OPTIM_METADATA = "critic_optimizer"
# Checkpoint metadata key of the memory model a ``mag`` rollout ran with (source, name, weights
# digest).
MEMORY_MODEL_METADATA = "memory_model"


@dataclass
class _Clips:
    """Prompts and camera tracks of one micro-batch, on the device."""

    context: Tensor         # [B, L, text_dim]
    uncond: Tensor          # [B, L, text_dim] the empty prompt
    width_offsets: Tensor | None  # [B, N] in patches (camera-anchored), rollout frames only


class DMDStep:
    """Self-Forcing DMD: generator (the trainer's model), critic (trained here), teacher (frozen).

    The teacher is loaded with :func:`mag.train.networks.load_network` (eval, no gradient, sharded
    by ``shard_frozen`` like the generator but never activation-checkpointed); the critic starts
    from ``dmd.critic`` or a copy of the teacher, is prepared like the generator and has its own
    AdamW (``dmd.critic_lr``, ``dmd.critic_betas``; ``optim.weight_decay``, ``optim.grad_clip`` and
    the warm-up are shared).

    Every rollout (generator, history, critic) runs under ``dmd.rollout_policy``: ``full`` keeps
    every frame (Self-Forcing); ``mag`` is MAG stage 2 (docs/design.md §1): after each block the
    frozen memory model (``dmd.memory_model``: a ``memory`` file whose ``dit`` config equals the
    generator's; loaded once, eval, no gradient, sharded like the teacher) runs the clean block at
    t=0 with the empty prompt and writes the compressed K/V (sinks + each block's last frame), which
    the generator only reads; ``downsample`` keeps the same frames but the generator writes them
    (the "w/o stage 1" ablation). Rollouts may be longer than the teacher: they are scored window by
    window (``dmd.teacher_frames``), and the history loss generates every window after the first
    with the empty text under the same policy.

    Gradient reaches the generator through each block's exit step; ``dmd.grad_last_frames > 0``
    keeps it only for blocks in the last frames (earlier chunks are generated, and shape the cache,
    without gradient) and skips scoring the windows that hold none of them.
    """

    def __init__(self, ctx: StepContext, generator: nn.Module, dist: DistributedContext,
                 parallelize: Parallelize | None = None,
                 shard_frozen: Parallelize | None = None) -> None:
        self.ctx = ctx
        recipe, preset = ctx.recipe, ctx.preset
        self.dmd = recipe.dmd
        self.config = recipe.dmd.step_config(preset)
        self.schedule = DMDUpdateSchedule.from_config(self.config)
        self.generator = generator
        self.dist = dist
        # Teacher and critic are score networks: any generator stage, never a memory model.
        teacher = load_network(self.dmd.teacher, preset.dit, ctx.device,
                               expect_stage=GENERATOR_STAGES)
        self.teacher = self._check(teacher, "dmd.teacher", self.dmd.teacher)
        self.teacher.requires_grad_(False)
        self.teacher = shard_frozen(self.teacher) if shard_frozen is not None else self.teacher
        critic_source = self.dmd.critic or self.dmd.teacher
        critic = load_network(critic_source, preset.dit, ctx.device, expect_stage=GENERATOR_STAGES)
        critic = self._check(critic, "dmd.critic", critic_source).train()
        self.critic = parallelize(critic) if parallelize is not None else critic
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=self.dmd.critic_lr, betas=self.dmd.critic_betas,
            weight_decay=recipe.optim.weight_decay)
        self.memory_model, self.memory_record = self._load_memory_model()
        if self.memory_model is not None and shard_frozen is not None:
            self.memory_model = shard_frozen(self.memory_model)
        self.policy: CachePolicy = policy_from_name(self.dmd.rollout_policy, preset)
        self.writer = writer_for(self.policy, memory_model=self.memory_model,
                                 empty_context=ctx.empty_context)
        # Camera tracks go to whichever of the three networks is camera-anchored (each gets its own
        # frames' positions; a plain network gets none).
        self.camera_anchored = any(_camera_anchored(m) for m in (generator, self.teacher,
                                                                 self.critic))
        fpb = preset.cache.frames_per_block
        self.frames_per_block = fpb
        self.num_frames = self.dmd.rollout_blocks * fpb
        self.frame_shape = (preset.dit.in_channels, preset.video.latent_height,
                            preset.video.latent_width)
        self.num_steps = len(preset.scheduler.denoising_steps)
        windows = score_windows(torch.zeros(1, self.num_frames), self.dmd.teacher_frames,
                                self.dmd.window_overlap_frames)
        self.num_windows = windows.shape[0]
        # Windows holding a frame with gradient (all unless dmd.grad_last_frames): the ones DMD
        # scores.
        first_grad_frame = self.num_frames - (self.dmd.grad_last_frames or self.num_frames)
        stride = self.dmd.teacher_frames - self.dmd.window_overlap_frames
        self.scored_windows = tuple(i for i in range(self.num_windows)
                                    if i * stride + self.dmd.teacher_frames > first_grad_frame)
        # Per sample: the rollout's forwards (up to K steps + the write pass), the scored windows
        # (teacher with CFG and critic) and the critic's training windows, in tokens.
        self.tokens_per_sample = preset.tokens_per_frame * (
            self.num_frames * (self.num_steps + 1)
            + (3 * len(self.scored_windows) + self.num_windows) * self.dmd.teacher_frames)

    def _load_memory_model(self) -> tuple[WanDiT | None, dict[str, str]]:
        """The frozen memory model of a ``mag`` rollout and its checkpoint record (None, {}
        otherwise)."""
        if self.dmd.rollout_policy != "mag":
            return None, {}
        return load_frozen_memory_model(self.dmd.memory_model, self.ctx, "dmd.memory_model")

    def _check(self, model: WanDiT, field: str, source: str) -> WanDiT:
        cfg, dit = model.cfg, self.ctx.preset.dit
        ours = (dit.in_channels, dit.out_channels, dit.text_dim)
        if (cfg.in_channels, cfg.out_channels, cfg.text_dim) != ours:
            raise CheckpointError(
                f"{field} {source!r} has channels in/out {cfg.in_channels}/{cfg.out_channels} and "
                "text_dim"
                f" {cfg.text_dim}; the recipe's generator {dit.in_channels}/{dit.out_channels} and"
                f" {dit.text_dim}")
        return model

    # -------------------------------------------------------------------------- one step
    def train_step(self, step: int, optimizer: torch.optim.Optimizer, ema: EMA, lr_scale: float,
                   indices: range) -> dict[str, Tensor]:
        """One optimiser step: maybe the generator (schedule), then the critic; device tensors.

        ``stats``: ``loss`` / ``grad_norm`` the critic's; ``generator_loss``,
        ``generator_grad_norm``, ``dmd_gradient_abs`` (mean |g|) NaN on critic-only steps;
        ``generator_updated`` 0 or 1.
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
            grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(),
                                                       recipe.optim.grad_clip)
            optimizer.step()
            ema.update(self.generator, step)
            stats.update(generator_loss=total, generator_grad_norm=grad_norm,
                         dmd_gradient_abs=g_abs, generator_updated=torch.ones((), device=device))
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
        context = ctx.context(batch)
        camera = batch.camera_px[:, :self.num_frames]
        offsets = (
            (camera / ctx.preset.dit.patch_size[2]).to(ctx.device) if self.camera_anchored else None
        )
        return _Clips(context, ctx.empty_context.expand_as(context), offsets)

    def _rollout(self, clips: _Clips, exit_step: int, noise_draws: Tensor, *, grad: bool,
                 context_per_block: BlockContexts | None = None) -> Tensor:
        """The student's autoregressive sample ``[B, N, C, H, W]`` (gradient through the exit
        step)."""
        model = self.generator
        return self_forcing_rollout(
            model, self.ctx.scheduler, clips.context, num_blocks=self.dmd.rollout_blocks,
            frames_per_block=self.frames_per_block, frame_shape=self.frame_shape,
            policy=self.policy,
            writer=self.writer, exit_step=exit_step, noise_draws=noise_draws.to(self.ctx.device),
            grad=grad,
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
        """Teacher windows of a rollout ``[W, B, Fw, ...]`` and of its camera track (``[B, Fw]``
        each)."""
        windows = score_windows(x, self.dmd.teacher_frames, self.dmd.window_overlap_frames)
        if offsets is None:
            return windows, [None] * windows.shape[0]
        return windows, list(score_windows(offsets, self.dmd.teacher_frames,
                                           self.dmd.window_overlap_frames))

    def _scored_dmd_loss(self, x: Tensor, clips: _Clips, t: Tensor, noise: Tensor,
                         first_window: int = 0) -> tuple[Tensor, Tensor]:
        """:meth:`_dmd_loss` on the windows from ``first_window`` on that carry gradient
        (``self.scored_windows``); ``t: [W', B]`` and ``noise: [W', B, Fw, ...]`` hold one draw per
        window from ``first_window`` on (scored or not, so the draws do not depend on
        ``dmd.grad_last_frames``)."""
        windows, offsets = self._windows(x, clips.width_offsets)
        chosen = [i for i in self.scored_windows if i >= first_window]
        draws = [i - first_window for i in chosen]
        return self._dmd_loss(windows[chosen], [offsets[i] for i in chosen], t[draws], noise[draws],
                              clips)

    def _dmd_loss(self, windows: Tensor, offsets: list[Tensor | None], t: Tensor, noise: Tensor,
                  clips: _Clips) -> tuple[Tensor, Tensor]:
        """``L_DMD`` averaged over windows (each window its own clip with its own camera track), and
        mean |g|. Equal-size windows make this the loss of ``dmd_generator_loss(...,
        window_frames=Fw)``."""
        losses, g_abs = [], []
        for window, window_offsets, t_w, noise_w in zip(windows, offsets, t, noise, strict=True):
            out = dmd_generator_loss(
                window, self._x0_score(self.teacher, window, window_offsets),
                self._x0_score(self.critic, window, window_offsets), self.ctx.scheduler, t_w,
                noise_w,
                context=clips.context, uncond_context=clips.uncond,
                guidance_scale=self.config.guidance_scale)
            losses.append(out.loss)
            g_abs.append(out.gradient.abs().mean())
        return torch.stack(losses).mean(), torch.stack(g_abs).mean()

    def _x0_score(self, model: nn.Module, window: Tensor,
                  offsets: Tensor | None) -> Callable[[Tensor, Tensor, Any], Tensor]:
        """``model``'s DMD score on ``window`` under ``dmd.score_mode``."""
        if self.dmd.score_mode == "teacher_forced":
            return teacher_forced_x0_score(model, self.ctx.scheduler, window,
                                           self.frames_per_block, _for(model, offsets))
        return _x0_score(model, self.ctx.scheduler, offsets)

    def _generator_loss(self, step: int, micro: int, indices: range) -> tuple[Tensor, Tensor]:
        """``(1-λ) L_DMD + λ L_history`` (or one of them, by λ's mode) on one micro-batch, and mean
        |g|."""
        seed, lam, mode = (
            self.ctx.recipe.loop.seed,
            self.config.history_lambda,
            self.config.history_mode,
        )
        shared = draw_generator(seed, step, micro, 0, ROLE_SHARED_GENERATOR)
        exit_step = draw_exit_step(self.num_steps, shared)
        use_history = draw_history_choice(lam,
                                          shared) if lam > 0 and mode == "probability" else None
        clips = self._clips(step, micro, indices)
        l_dmd = l_hist = None
        g_abs = []
        if lam == 0 or mode == "weight" or not use_history:
            noise_draws, t, noise = self._sample_draws(step, micro, indices, ROLE_GENERATOR,
                                                       self.num_windows)
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
        """MAG's ``L_history`` (:func:`mag.objectives.dmd.history_loss`, window by window so each
        keeps its camera track): chunks after the first generated with the empty text, scored with
        the real."""
        noise_draws, t, noise = self._sample_draws(step, micro, indices, ROLE_HISTORY,
                                                   self.num_windows - 1)
        contexts = history_block_contexts(clips.context, clips.uncond,
                                          frames_per_block=self.frames_per_block,
                                          first_chunk_frames=self.dmd.teacher_frames)
        x = self._rollout(clips, exit_step, noise_draws, grad=True, context_per_block=contexts)
        return self._scored_dmd_loss(x, clips, t, noise, first_window=1)

    def _critic_loss(self, step: int, micro: int, indices: range) -> Tensor:
        """Flow matching of the critic on a fresh no-grad rollout, window by window (mean over
        windows)."""
        shared = draw_generator(self.ctx.recipe.loop.seed, step, micro, 0, ROLE_SHARED_CRITIC)
        exit_step = draw_exit_step(self.num_steps, shared)
        clips = self._clips(step, micro, indices)
        noise_draws, t, noise = self._sample_draws(step, micro, indices, ROLE_CRITIC,
                                                   self.num_windows)
        x = self._rollout(clips, exit_step, noise_draws, grad=False)
        windows, offsets = self._windows(x.detach(), clips.width_offsets)
        scheduler, fpb = self.ctx.scheduler, self.frames_per_block
        losses = []
        for window, window_offsets, t_w, noise_w in zip(windows, offsets, t, noise, strict=True):
            camera = _for(self.critic, window_offsets)
            if self.dmd.score_mode == "teacher_forced":  # one level for every block of the window
                levels = t_w[:, None].expand(window.shape[0], window.shape[1] // fpb)
                out = causal_flow_matching_loss(self.critic, scheduler, window, clips.context, fpb,
                                                noise_w, levels, camera)
            else:
                out = teacher_flow_matching_loss(self.critic, scheduler, window, clips.context,
                                                 noise_w, t_w, camera)
            losses.append(out.loss)
        return torch.stack(losses).mean()

    # -------------------------------------------------------------------------- checkpoint
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The critic's weights and optimiser as checkpoint ``extra`` tensors + metadata (full
        tensors; under FSDP a collective, with the tensors on the main rank)."""
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
        """Restore the critic; refuse a memory model whose weights differ from the checkpoint's
        run."""
        stored = metadata.get(MEMORY_MODEL_METADATA)
        if isinstance(stored, dict) and self.memory_record and (
                stored.get("weights_sha256") != self.memory_record["weights_sha256"]):
            raise CheckpointError(f"dmd.memory_model {self.memory_record['source']!r} has other "
                                  "weights than"
                                  " the memory model this run started with "
                                  f"({stored.get('source')!r});"
                                  " resume with the same memory model file, or start a new run")
        skeleton = metadata.get(CRITIC_OPTIM_METADATA)
        weights = {k[len(CRITIC_MODEL_PREFIX):]: v for k, v in extra.items()
                   if k.startswith(CRITIC_MODEL_PREFIX)}
        if not weights or not isinstance(skeleton, dict):
            raise CheckpointError("the checkpoint holds no critic state; it was not written by a "
                                  "dmd run")
        optim = unflatten_optimizer_state({k[len(CRITIC_OPTIM_PREFIX):]: v for k, v in extra.items()
                                      if k.startswith(CRITIC_OPTIM_PREFIX)
                                      and not k.startswith(CRITIC_MODEL_PREFIX)}, skeleton)
        if is_sharded(self.critic):
            load_full_model_state(self.critic, weights)
            load_full_optimizer_state(self.critic, self.critic_optimizer, optim)
            return
        missing, unexpected = self.critic.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError("the checkpoint's critic does not fit dmd.critic: missing "
                                  f"{missing[:5]},"
                                  f" unexpected {unexpected[:5]}")
        self.critic_optimizer.load_state_dict(optim)


def _camera_anchored(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and cfg.camera_rope)


def _for(model: nn.Module, width_offsets: Tensor | None) -> Tensor | None:
    """Camera positions for ``model`` if it is camera-anchored, else None (it refuses them)."""
    return width_offsets if _camera_anchored(model) else None


def _x0_score(model: nn.Module, scheduler: FlowMatchScheduler,
              width_offsets: Tensor | None) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """A DMD score ``(x_t, t, context) -> x0`` of a bidirectional model on one window (positions
    0..Fw-1), with the window's camera track when the model is camera-anchored."""
    offsets = _for(model, width_offsets)

    def predict(x_t: Tensor, t: Tensor, context: Any) -> Tensor:
        return scheduler.to_x0(model(x_t, t, context, width_offsets=offsets), x_t, t)

    return predict
