"""The ``memory`` step runner (MAG stage 1): the memory model reconstructs whole blocks from their
compressed last frames, with the empty prompt; one loss per micro-batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mag.memory import (
    sample_memory_timesteps,
    sample_start_position,
)
from mag.objectives.flow_matching import (
    LossOutput,
)
from mag.objectives.memory import memory_reconstruction_loss
from mag.train.steps.base import ROLE_SAMPLE, ROLE_SHARED_MEMORY, StepContext, draw_generator


@dataclass
class MemoryDraws:
    """Random draws of a memory micro-batch: ``noise`` like the clips ``[B, N, C, H, W]``,
    ``timestep`` ``[B, N / F]`` (few-step levels, one per block) and the shared first RoPE
    position."""

    noise: Tensor
    timestep: Tensor
    start_position: int


class MemoryStep:
    """``memory``: the stage-1 memory model rebuilds whole clips from their compressed memory.

    One parallel pass over ``[clean ; noisy]`` of each clip under
    :func:`mag.memory.memory_training_mask` with the empty prompt (``""`` of the prompt cache;
    ``objective.cfg_dropout`` does not apply), x0-MSE on the noisy half
    (:func:`mag.objectives.memory.memory_reconstruction_loss`). Each sample draws, from its own
    keyed stream, one few-step level per block and then its noise; the first RoPE position (a
    multiple of the block size, the clip inside ``dit.rope_max_positions``) is one per micro-batch,
    from index 0 of ``ROLE_SHARED_MEMORY``, since the parallel pass takes one. Camera-anchored
    presets get the clips' camera tracks. Recall-signal categories are logged as for flow matching:
    ``recall`` pixels are views last seen more than ``recall_window_frames`` earlier, which only
    earlier blocks' retained frames can bring back.
    """

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        frames = ctx.recipe.data.clip_frames
        self.num_blocks = frames // ctx.preset.cache.frames_per_block
        self.tokens_per_sample = 2 * frames * ctx.preset.tokens_per_frame
        if not ctx.recipe.init.model:
            warnings.warn(f"recipe {ctx.recipe.name!r} trains a memory model without init.model: "
                          "it starts"
                          " from random weights, not from the generator whose blocks it will "
                          "compress"
                          " (docs/design.md §1); set init.model to the generator's model file or "
                          "registry"
                          " name",
                          UserWarning, stacklevel=2)

    def draws(self, step: int, micro: int, indices: range, clip_shape: tuple[int,
                                                                             ...]) -> MemoryDraws:
        """The draws of samples ``indices`` of one micro-batch of clips ``clip_shape = (N, C, H,
        W)``."""
        ctx = self.ctx
        seed = ctx.recipe.loop.seed
        noise, timestep = [], []
        for i in indices:
            gen = draw_generator(seed, step, micro, i, ROLE_SAMPLE)
            timestep.append(sample_memory_timesteps(ctx.scheduler, 1, self.num_blocks,
                                                    generator=gen))
            noise.append(torch.randn(clip_shape, generator=gen))
        start = sample_start_position(clip_shape[0], ctx.preset.cache.frames_per_block,
                                      ctx.preset.dit.rope_max_positions,
                                      generator=draw_generator(seed, step, micro, 0,
                                                               ROLE_SHARED_MEMORY))
        return MemoryDraws(torch.stack(noise), torch.cat(timestep), start)

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput,
                                                                                     Tensor]:
        """The reconstruction loss of this rank's samples of one micro-batch, and their recall
        categories ``[B, N, W]``."""
        ctx = self.ctx
        batch = ctx.data.batch(step, micro, indices)
        draws = self.draws(step, micro, indices, tuple(batch.video.shape[1:]))
        out = memory_reconstruction_loss(model, ctx.scheduler, batch.video.to(ctx.device),
                                         ctx.empty_context,
                                         draws.noise.to(ctx.device), draws.timestep.to(ctx.device),
                                         draws.start_position, ctx.width_offsets(batch.camera_px))
        return out, ctx.categories(batch.offsets)
