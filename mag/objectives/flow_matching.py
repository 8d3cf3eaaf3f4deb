"""Flow-matching objectives: the bidirectional teacher and the teacher-forced block-causal student.

Both regress the preset's parameterisation target (velocity ``eps - x0`` or the clean ``x0``) at
shifted uniform noise levels. The causal objective (CausVid-style initialisation) runs one parallel
pass over ``[clean ; noisy]``: clean frames attend block-causally to clean frames (they play the KV
cache), and noisy block ``i`` sees the clean blocks before it plus itself -- exactly what block
``i`` sees when it is denoised while streaming with a full cache. The same pass scores windows for
DMD with such a model as teacher (:func:`teacher_forced_x0_score`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        raise InputError(f"{num_frames} frames is not a multiple of the block size "
                         f"{frames_per_block}")
    block = torch.arange(num_frames, device=device) // frames_per_block
    q, k = block[:, None], block[None, :]
    mask = torch.zeros(2 * num_frames, 2 * num_frames, dtype=torch.bool, device=device)
    mask[:num_frames, :num_frames] = k <= q
    mask[num_frames:, :num_frames] = k < q
    mask[num_frames:, num_frames:] = k == q
    return mask


def apply_cfg_dropout(context: Tensor, empty_context: Tensor, drop: Tensor) -> Tensor:
    """Use the empty prompt where ``drop: [B] bool`` is set (classifier-free guidance dropout)."""
    return torch.where(drop[:, None, None], empty_context.expand_as(context), context)


def flow_matching_target(scheduler: FlowMatchScheduler, x0: Tensor, noise: Tensor) -> Tensor:
    """What the model regresses: the clean ``x0`` or the velocity ``noise - x0``."""
    return x0 if scheduler.prediction == "x0" else scheduler.velocity_target(x0, noise)


def teacher_flow_matching_loss(model: torch.nn.Module, scheduler: FlowMatchScheduler, x0: Tensor,
                               context: Tensor, noise: Tensor, timestep: Tensor,
                               width_offsets: Tensor | None = None) -> LossOutput:
    """Bidirectional flow matching on whole clips ``x0: [B, F, C, H, W]``, one noise level per clip.

    ``noise`` is like ``x0``; ``timestep: [B]`` (drawn by the caller, e.g.
    ``sample_training_timesteps``); ``width_offsets: [B, F]`` camera positions in patches for
    camera-anchored models.
    """
    _check_draws(x0, noise)
    x_t = scheduler.add_noise(x0, noise, timestep)
    out = model(x_t, timestep, context, width_offsets=width_offsets)
    per_element = (out.float() - flow_matching_target(scheduler, x0, noise).float()) ** 2
    return LossOutput(per_element.mean(), per_element.detach())


def causal_flow_matching_loss(model: torch.nn.Module, scheduler: FlowMatchScheduler, x0: Tensor,
                              context: Tensor, frames_per_block: int, noise: Tensor,
                              block_timestep: Tensor,
                              width_offsets: Tensor | None = None) -> LossOutput:
    """Teacher-forced block-causal flow matching; each block has its own noise level.

    ``x0: [B, F, C, H, W]`` clean latents, ``noise`` like it, ``block_timestep: [B, F /
    frames_per_block]``. The loss is taken on the noisy half only.
    """
    _check_draws(x0, noise)
    num_frames = x0.shape[1]
    t_frame = block_timestep.repeat_interleave(frames_per_block, dim=1)
    if t_frame.shape != x0.shape[:2]:
        raise InputError(f"block_timestep {tuple(block_timestep.shape)} does not cover "
                         f"{num_frames} frames"
                         f" in blocks of {frames_per_block}")
    x_t = scheduler.add_noise(x0, noise, t_frame)
    mask = teacher_forcing_mask(num_frames, frames_per_block, device=x0.device)
    out = clean_noisy_forward(model, x0, x_t, t_frame, context, mask, width_offsets=width_offsets)
    per_element = (out.float() - flow_matching_target(scheduler, x0, noise).float()) ** 2
    return LossOutput(per_element.mean(), per_element.detach())


def clean_noisy_forward(model: torch.nn.Module, x0: Tensor, x_t: Tensor, t_frame: Tensor,
                        context: Any, frame_mask: Tensor, *, start_position: int = 0,
                        width_offsets: Tensor | None = None) -> Tensor:
    """One parallel pass over ``[clean ; noisy]``; returns the raw output for the noisy half.

    The clean frames (t=0) stand in for the KV cache; both halves share RoPE positions
    ``start_position + arange(F)`` and camera positions. ``frame_mask`` ``[2F, 2F]`` says who sees
    whom (teacher forcing, the memory model's compressed view, ...). ``x0, x_t: [B, F, C, H, W]``,
    ``t_frame: [B, F]``.
    """
    num_frames = x0.shape[1]
    sequence = torch.cat([x0, x_t], dim=1)
    timesteps = torch.cat([torch.zeros_like(t_frame), t_frame], dim=1)
    end_position = start_position + num_frames
    positions = torch.arange(start_position, end_position, device=x0.device).repeat(2)
    offsets = None if width_offsets is None else width_offsets.repeat(1, 2)
    return model(sequence, timesteps, context, frame_positions=positions, frame_mask=frame_mask,
                 width_offsets=offsets)[:, num_frames:]


def teacher_forced_x0_score(model: torch.nn.Module, scheduler: FlowMatchScheduler, clean: Tensor,
                            frames_per_block: int,
                            width_offsets: Tensor | None = None,
                            ) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """A DMD score ``(x_t, t, context) -> x0`` of a block-causal model trained with teacher
    forcing (``causal_fm``): each noisy block of a window is scored given the clean blocks before
    it.

    ``clean: [B, Fw, C, H, W]`` is the window the noisy input was made from (detached here); one
    parallel pass over ``[clean ; noisy]`` under :func:`teacher_forcing_mask`, the sequence such a
    model was trained on. The blocks' conditional scores make up the score of the window's
    autoregressive law, so DMD matches the student's conditionals to the teacher's. ``t: [B]``.
    """
    clean = clean.detach()
    mask = teacher_forcing_mask(clean.shape[1], frames_per_block, device=clean.device)

    def predict(x_t: Tensor, t: Tensor, context: Any) -> Tensor:
        t_frame = t[:, None].expand(clean.shape[:2])
        out = clean_noisy_forward(model, clean, x_t, t_frame, context, mask,
                                  width_offsets=width_offsets)
        return scheduler.to_x0(out, x_t, t)

    return predict


def _check_draws(x0: Tensor, noise: Tensor) -> None:
    if noise.shape != x0.shape:
        raise InputError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")
