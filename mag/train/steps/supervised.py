"""Supervised step runners, one loss per micro-batch: ``teacher_fm`` / ``causal_fm`` flow matching
(:class:`FlowMatchingStep`) and ``ode`` regression onto the teacher's trajectories
(:class:`ODEStep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mag.errors import ConfigError
from mag.objectives.flow_matching import (
    LossOutput,
    apply_cfg_dropout,
    causal_flow_matching_loss,
    teacher_flow_matching_loss,
)
from mag.objectives.ode import (
    load_ode_pairs,
    ode_regression_loss,
)
from mag.train.steps.base import StepContext, sample_generator


@dataclass
class SampleDraws:
    """Random draws of a micro-batch: ``noise`` like the clips, ``timestep`` ``[B]`` (teacher) or
    ``[B, blocks]`` (causal), ``drop_text`` ``[B]`` bool (CFG dropout)."""

    noise: Tensor
    timestep: Tensor
    drop_text: Tensor


class FlowMatchingStep:
    """``teacher_fm`` / ``causal_fm``: flow matching on world clips (one loss per micro-batch)."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.causal = ctx.recipe.objective.kind == "causal_fm"
        data = ctx.recipe.data
        self.tokens_per_sample = (
            data.clip_frames * ctx.preset.tokens_per_frame * (2 if self.causal else 1)
        )

    def _draws(self, step: int, micro: int, indices: range, clip_shape: tuple[int,
                                                                              ...]) -> SampleDraws:
        ctx = self.ctx
        per_sample_t = (1,
                        clip_shape[0] // ctx.preset.cache.frames_per_block) if self.causal else (1,)
        noise, timestep, drop = [], [], []
        for i in indices:
            gen = sample_generator(ctx.recipe.loop.seed, step, micro, i)
            timestep.append(ctx.scheduler.sample_training_timesteps(per_sample_t, generator=gen))
            drop.append(torch.rand(1, generator=gen) < ctx.recipe.objective.cfg_dropout)
            noise.append(torch.randn(clip_shape, generator=gen))
        return SampleDraws(torch.stack(noise), torch.cat(timestep), torch.cat(drop))

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput,
                                                                                     Tensor]:
        """The loss of this rank's samples of one micro-batch, and their recall categories ``[B, F,
        W]``."""
        ctx = self.ctx
        batch = ctx.data.batch(step, micro, indices)
        draws = self._draws(step, micro, indices, tuple(batch.video.shape[1:]))
        video, noise = batch.video.to(ctx.device), draws.noise.to(ctx.device)
        context = apply_cfg_dropout(ctx.context(batch), ctx.empty_context,
                                    draws.drop_text.to(ctx.device))
        timestep = draws.timestep.to(ctx.device)
        offsets = ctx.width_offsets(batch.camera_px)
        if self.causal:
            out = causal_flow_matching_loss(model, ctx.scheduler, video, context,
                                            ctx.preset.cache.frames_per_block, noise, timestep,
                                            offsets)
        else:
            out = teacher_flow_matching_loss(model, ctx.scheduler, video, context, noise, timestep,
                                             offsets)
        return out, ctx.categories(batch.offsets)


class ODEStep:
    """``ode``: the causal student regresses the teacher's ODE endpoint (pairs from ``ode.pairs``).

    Each sample draws a clip of the file and one few-step level per block (uniform), from its own
    keyed generator.
    """

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.pairs = load_ode_pairs(ctx.recipe.ode.pairs)
        frames = self.pairs.x0.shape[1]
        fpb = ctx.preset.cache.frames_per_block
        expected = ctx.scheduler.few_step_timesteps()
        if self.pairs.timesteps.shape != expected.shape or not torch.allclose(self.pairs.timesteps,
                                                                              expected):
            raise ConfigError(f"{ctx.recipe.ode.pairs} holds levels "
                              f"{self.pairs.timesteps.tolist()}, but the"
                              f" recipe's scheduler steps through {expected.tolist()}; regenerate "
                              "the pairs")
        if frames % fpb:
            raise ConfigError(f"{ctx.recipe.ode.pairs} holds {frames}-frame clips, not a multiple "
                              "of the"
                              f" block size {fpb}")
        if ctx.preset.dit.camera_rope and self.pairs.camera_px is None:
            raise ConfigError(f"{ctx.recipe.ode.pairs} has no camera tracks, which the "
                              "camera-anchored"
                              " preset (dit.camera_rope) needs; regenerate it with a "
                              "camera-anchored teacher")
        self.num_blocks = frames // fpb
        self.tokens_per_sample = 2 * frames * ctx.preset.tokens_per_frame

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput,
                                                                                     Tensor]:
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
                                  pairs.x0[chosen].to(ctx.device),
                                  pairs.context[chosen].to(ctx.device),
                                  ctx.preset.cache.frames_per_block,
                                  torch.cat(level).to(ctx.device), camera)
        return out, ctx.categories(pairs.offsets[chosen])
