"""Flow-matching objectives: the bidirectional teacher and the teacher-forced block-causal student.

Both regress the preset's parameterisation target (velocity ``eps - x0`` or the clean ``x0``) at
shifted uniform noise levels. The causal objective (CausVid-style initialisation) runs one parallel
pass over ``[clean ; noisy]``: clean frames attend block-causally to clean frames (they play the KV
cache), and noisy block ``i`` sees the clean blocks before it plus itself -- exactly what block ``i``
sees when it is denoised while streaming with a full cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mag.errors import InputError
from mag.schedulers import FlowMatchScheduler


@dataclass
class LossOutput:
    """``loss`` is the scalar to minimise; ``per_element`` ``[B, F, C, H, W]`` feeds diagnostics."""

    loss: Tensor
    per_element: Tensor


def teacher_forcing_mask(num_frames: int, frames_per_block: int,
                        device: torch.device | str = "cpu") -> Tensor:
    """Frame-level mask ``[2F, 2F]`` (True = may attend) over the sequence ``[clean ; noisy]``.

    - clean query in block i: clean keys of blocks <= i;
    - noisy query in block i: clean keys of blocks < i, and the noisy keys of block i.
    """
    if num_frames % frames_per_block:
        raise InputError(f"{num_frames} frames is not a multiple of the block size {frames_per_block}")
    block = torch.arange(num_frames, device=device) // frames_per_block
    q, k = block[:, None], block[None, :]
    mask = torch.zeros(2 * num_frames, 2 * num_frames, dtype=torch.bool, device=device)
    mask[:num_frames, :num_frames] = k <= q
    mask[num_frames:, :num_frames] = k < q
    mask[num_frames:, num_frames:] = k == q
    return mask


def apply_cfg_dropout(context: Tensor, empty_context: Tensor, probability: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample's prompt by the empty prompt with ``probability`` (classifier-free guidance)."""
    if probability <= 0:
        return context
    drop = torch.rand(context.shape[0], generator=generator, device=context.device) < probability
    return torch.where(drop[:, None, None], empty_context.expand_as(context), context)


def _target(scheduler: FlowMatchScheduler, x0: Tensor, noise: Tensor) -> Tensor:
    return x0 if scheduler.prediction == "x0" else scheduler.velocity_target(x0, noise)


def teacher_flow_matching_loss(model: torch.nn.Module, scheduler: FlowMatchScheduler, x0: Tensor,
                               context: Tensor, generator: torch.Generator | None = None) -> LossOutput:
    """Bidirectional flow matching on whole clips ``x0: [B, F, C, H, W]``, one noise level per clip."""
    batch = x0.shape[0]
    t = scheduler.sample_training_timesteps((batch,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t, context)
    per_element = (out.float() - _target(scheduler, x0, noise).float()) ** 2
    return LossOutput(per_element.mean(), per_element.detach())


def causal_flow_matching_loss(model: torch.nn.Module, scheduler: FlowMatchScheduler, x0: Tensor,
                              context: Tensor, frames_per_block: int,
                              generator: torch.Generator | None = None) -> LossOutput:
    """Teacher-forced block-causal flow matching; each block draws its own noise level.

    ``x0: [B, F, C, H, W]`` clean latents; the loss is taken on the noisy half only.
    """
    batch, num_frames = x0.shape[:2]
    num_blocks = num_frames // frames_per_block
    t_block = scheduler.sample_training_timesteps((batch, num_blocks), generator=generator, device=x0.device)
    t_frame = t_block.repeat_interleave(frames_per_block, dim=1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t_frame)
    sequence = torch.cat([x0, x_t], dim=1)
    timesteps = torch.cat([torch.zeros_like(t_frame), t_frame], dim=1)
    positions = torch.arange(num_frames, device=x0.device).repeat(2)
    mask = teacher_forcing_mask(num_frames, frames_per_block, device=x0.device)
    out = model(sequence, timesteps, context, frame_positions=positions, frame_mask=mask)[:, num_frames:]
    per_element = (out.float() - _target(scheduler, x0, noise).float()) ** 2
    return LossOutput(per_element.mean(), per_element.detach())
