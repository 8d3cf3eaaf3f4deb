"""Stage-1 objective: train the memory model to reconstruct whole blocks from their compressed
memory.

One parallel pass over ``[clean ; noisy]`` of a whole clip under
:func:`mag.memory.memory_training_mask`: clean frames play the memory writes (each block reduced to
its last frame's K/V for everything after it), and each noisy block, at a timestep of the few-step
list, sees only the retained frames of blocks up to and including its own. The loss is the MSE
between the x0-prediction of the noisy half and the clean latents (docs/design.md, "Memory model
(MAG stage 1)"). All random draws (noise, timesteps, the start position) come in as arguments, as in
:mod:`mag.objectives.flow_matching`.
"""

from __future__ import annotations

from torch import Tensor

from mag.errors import InputError
from mag.memory import memory_training_mask
from mag.models.attention import CrossAttentionCache
from mag.models.dit import WanDiT
from mag.objectives.flow_matching import LossOutput, clean_noisy_forward
from mag.schedulers import FlowMatchScheduler

__all__ = ["memory_reconstruction_loss"]


def memory_reconstruction_loss(model: WanDiT, scheduler: FlowMatchScheduler, x0: Tensor,
                               empty_context: Tensor | CrossAttentionCache, noise: Tensor,
                               timestep_per_block: Tensor, start_position: int,
                               width_offsets: Tensor | None = None) -> LossOutput:
    """x0-reconstruction loss of the memory model on clips ``x0: [B, N, C, H, W]`` (N a multiple of
    F).

    Args:
        empty_context: ``[1 or B, L, text_dim]`` embeddings of the empty prompt (or a projected
        cache). noise: like ``x0``; the noisy half is ``add_noise(x0, noise, t)``.
        timestep_per_block: ``[B, N / F]`` timesteps, each a value of
        ``scheduler.few_step_timesteps()``
            (:func:`mag.memory.sample_memory_timesteps`); the block size F is ``N / blocks``.
        start_position: RoPE position of the first frame, a multiple of F
            (:func:`mag.memory.sample_start_position`); clean and noisy halves share positions.
        width_offsets: ``[B, N]`` camera positions in patches, for camera-anchored models.
    Returns:
        :class:`LossOutput`; ``per_element`` ``[B, N, C, H, W]`` is the squared x0 error of each
        frame.
    """
    if noise.shape != x0.shape:
        raise InputError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")
    batch, num_frames = x0.shape[:2]
    if timestep_per_block.ndim != 2 or timestep_per_block.shape[0] != batch:
        raise InputError(f"timestep_per_block must be [{batch}, blocks],"
                         f" got {list(timestep_per_block.shape)}")
    num_blocks = timestep_per_block.shape[1]
    if num_blocks == 0 or num_frames % num_blocks:
        raise InputError(f"{num_frames} frames do not split into {num_blocks} equal blocks")
    frames_per_block = num_frames // num_blocks
    if start_position < 0 or start_position % frames_per_block:
        raise InputError(f"start_position must be a non-negative multiple of the block size"
                         f" {frames_per_block}, got {start_position}")
    max_positions = model.cfg.rope_max_positions
    if start_position + num_frames > max_positions:
        raise InputError(f"positions {start_position}..{start_position + num_frames - 1} exceed"
                         f" dit.rope_max_positions={max_positions}")
    if isinstance(empty_context, Tensor) and empty_context.shape[0] == 1 and batch > 1:
        empty_context = empty_context.expand(batch, *empty_context.shape[1:])

    t_frame = timestep_per_block.to(x0.device).repeat_interleave(frames_per_block, dim=1)
    x_t = scheduler.add_noise(x0, noise, t_frame)
    mask = memory_training_mask(num_frames, frames_per_block, device=x0.device)
    out = clean_noisy_forward(model, x0, x_t, t_frame, empty_context, mask,
                              start_position=start_position, width_offsets=width_offsets)
    prediction = scheduler.to_x0(out, x_t, t_frame)
    per_element = (prediction.float() - x0.float()) ** 2
    return LossOutput(per_element.mean(), per_element.detach())
