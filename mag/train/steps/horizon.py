"""The ``horizon`` step runner: flow matching on blocks that read the two-tier memory (policy
``archive``) of long leave-and-return clips, so the context a block trains with is the one it reads
when streaming: sinks, frames retrieved from the archive at re-assigned positions, the ring.

Each micro-batch streams its clips teacher-forced through an :class:`~mag.cache.ArchiveCache` that
the frozen memory model writes (no gradient); before a scored block is written, the trained model
denoises it from one drawn noise level reading that cache. Scored: the clip's last
``horizon.return_blocks`` (a loop's return) and ``horizon.other_blocks`` drawn per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mag.cache import ArchivePolicy
from mag.memory import MemoryWriter
from mag.objectives.flow_matching import (
    LossOutput,
    apply_cfg_dropout,
    flow_matching_target,
)
from mag.pipelines import StreamingGenerator, policy_from_name
from mag.train.steps.base import (
    ROLE_SAMPLE,
    ROLE_SHARED_HORIZON,
    StepContext,
    draw_generator,
    load_frozen_memory_model,
)


@dataclass
class HorizonDraws:
    """Random draws of a micro-batch: ``scored`` block indices (ascending, shared by the batch),
    ``noise`` ``[B, scored, F, C, H, W]``, ``timestep`` ``[B, scored]``, ``drop_text`` ``[B]``."""

    scored: tuple[int, ...]
    noise: Tensor
    timestep: Tensor
    drop_text: Tensor


class HorizonStep:
    """``horizon``: see the module docstring; one loss per micro-batch (mean over scored blocks).

    The stream is :class:`~mag.pipelines.StreamingGenerator` with the memory model's writer, as
    when streaming with ``--policy archive --memory-model``; the scored forward is the model's own
    with the stream's cache, RoPE positions and camera, and the prompt after CFG dropout.
    """

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        horizon, preset = ctx.recipe.horizon, ctx.preset
        self.memory_model, self.memory_record = load_frozen_memory_model(
            horizon.memory_model, ctx, "horizon.memory_model")
        self.policy = policy_from_name("archive", preset)
        assert isinstance(self.policy, ArchivePolicy)
        self.writer = MemoryWriter(self.memory_model, ctx.empty_context)
        fpb = preset.cache.frames_per_block
        self.frames_per_block = fpb
        self.num_blocks = ctx.recipe.data.clip_frames // fpb
        self.first_block = -(-preset.cache.memory_sink_frames // fpb)  # after the sink blocks
        self.return_start = self.num_blocks - horizon.return_blocks
        scored = horizon.return_blocks + horizon.other_blocks
        # The memory model's write pass per block, and the scored blocks' forward.
        self.tokens_per_sample = ctx.preset.tokens_per_frame * fpb * (self.num_blocks + scored)

    def draws(self, step: int, micro: int, indices: range,
              block_shape: tuple[int, ...]) -> HorizonDraws:
        """The draws of samples ``indices`` of one micro-batch of blocks ``(F, C, H, W)``."""
        ctx, seed = self.ctx, self.ctx.recipe.loop.seed
        shared = draw_generator(seed, step, micro, 0, ROLE_SHARED_HORIZON)
        candidates = torch.arange(self.first_block, self.return_start)
        chosen = candidates[torch.randperm(len(candidates), generator=shared)]
        other = chosen[:ctx.recipe.horizon.other_blocks].tolist()
        scored = tuple(sorted(other + list(range(self.return_start, self.num_blocks))))
        noise, timestep, drop = [], [], []
        for i in indices:
            gen = draw_generator(seed, step, micro, i, ROLE_SAMPLE)
            timestep.append(ctx.scheduler.sample_training_timesteps((1, len(scored)),
                                                                    generator=gen))
            drop.append(torch.rand(1, generator=gen) < ctx.recipe.objective.cfg_dropout)
            noise.append(torch.randn((len(scored), *block_shape), generator=gen))
        return HorizonDraws(scored, torch.stack(noise), torch.cat(timestep), torch.cat(drop))

    def loss(self, model: nn.Module, step: int, micro: int, indices: range) -> tuple[LossOutput,
                                                                                     Tensor]:
        """The loss of this rank's samples of one micro-batch, and the recall categories ``[B,
        scored * F, W]`` of the scored frames."""
        ctx, fpb = self.ctx, self.frames_per_block
        batch = ctx.data.batch(step, micro, indices)
        video = batch.video.to(ctx.device)  # [B, N, C, H, W]
        draws = self.draws(step, micro, indices, (fpb, *video.shape[2:]))
        context = apply_cfg_dropout(ctx.context(batch), ctx.empty_context,
                                    draws.drop_text.to(ctx.device))
        offsets = ctx.width_offsets(batch.camera_px)
        stream = StreamingGenerator(model, ctx.scheduler, ctx.preset, self.policy,
                                    writer=self.writer)
        stream.reset(len(indices), video.shape[1])
        stream.set_prompt(context)
        outputs, targets, done = [], [], 0
        for k, block in enumerate(draws.scored):
            start = block * fpb
            if start > done:
                stream.feed(video[:, done:start], None if offsets is None
                            else offsets[:, done:start])
            frames = slice(start, start + fpb)
            camera = None if offsets is None else offsets[:, frames]
            x0, noise = video[:, frames], draws.noise[:, k].to(ctx.device)
            t = draws.timestep[:, k].to(ctx.device)
            cache = stream.cache
            assert cache is not None
            cache.prepare_block(start, camera)
            first = cache.rope_position(start)
            positions = torch.arange(first, first + fpb, device=ctx.device)
            x_t = ctx.scheduler.add_noise(x0, noise, t)
            outputs.append(model(x_t, t, context, frame_positions=positions, kv_cache=cache,
                                 width_offsets=camera))
            targets.append(flow_matching_target(ctx.scheduler, x0, noise))
            stream.feed(x0, camera)
            done = start + fpb
        per_element = (torch.cat(outputs, 1).float() - torch.cat(targets, 1).float()) ** 2
        frames = torch.cat([torch.arange(b * fpb, (b + 1) * fpb) for b in draws.scored])
        categories = ctx.categories(batch.offsets)[:, frames.to(ctx.device)]
        return LossOutput(per_element.mean(), per_element.detach()), categories
