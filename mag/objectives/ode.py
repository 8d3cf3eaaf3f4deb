"""ODE regression (Self-Forcing's initialisation of the causal student from teacher trajectories).

The frozen bidirectional teacher integrates the guided probability-flow ODE; its states at the
few-step levels and its endpoint form one training pair per clip (:func:`sample_ode_trajectory`,
written by ``mag train ode-pairs``). The student sees ``[x0 ; x_{t_k}]`` under the teacher-forcing
mask, one level ``k`` per block, and regresses ``x0`` (:func:`ode_regression_loss`). The pairs file
(one safetensors file, written atomically) is described in docs/training.md, "Training chain".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from mag.errors import CheckpointError, InputError
from mag.io.files import SAFETENSORS_SUFFIXES, atomic_path
from mag.objectives.flow_matching import LossOutput, clean_noisy_forward, teacher_forcing_mask
from mag.schedulers import FlowMatchScheduler

__all__ = ["ODE_PAIRS_FORMAT", "ODEPairs", "few_step_indices", "load_ode_pairs",
           "ode_regression_loss", "sample_ode_trajectory", "save_ode_pairs"]

ODE_PAIRS_FORMAT = "mag-ode-pairs-v1"
# Guidance scale at which the unconditional teacher pass is skipped.
NO_GUIDANCE = 1.0
_REQUIRED = ("trajectory", "x0", "context", "timesteps", "offsets")


@dataclass
class ODEPairs:
    """Teacher trajectories of ``N`` clips at ``K`` few-step levels (see the module docstring)."""

    trajectory: Tensor
    x0: Tensor
    context: Tensor
    timesteps: Tensor
    offsets: Tensor
    camera_px: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def validate(self, source: str = "ode pairs") -> ODEPairs:
        n, frames = self.x0.shape[:2]
        k = self.timesteps.shape[0]
        expected = {"trajectory": (n, k, *self.x0.shape[1:]), "context": (n,
                                                                          *self.context.shape[1:]),
                    "offsets": (n, frames)}
        if self.camera_px is not None:
            expected["camera_px"] = (n, frames)
        for name, shape in expected.items():
            found = tuple(getattr(self, name).shape)
            if found != shape:
                raise InputError(f"{source}: {name} must be {list(shape)} (x0 "
                                 f"{list(self.x0.shape)},"
                                 f" {k} timesteps), got {list(found)}")
        if self.x0.ndim != 5 or self.timesteps.ndim != 1 or n == 0:
            raise InputError(f"{source}: x0 must be [N > 0, F, C, H, W] and timesteps [K], got"
                             f" {list(self.x0.shape)} and {list(self.timesteps.shape)}")
        return self


def save_ode_pairs(path: str | Path, pairs: ODEPairs) -> Path:
    """Write ``pairs`` to one safetensors file via ``<path>.tmp`` + rename (no partial file
    survives)."""
    pairs.validate()
    path = Path(path)
    tensors = {name: getattr(pairs, name).detach().contiguous().cpu() for name in _REQUIRED}
    if pairs.camera_px is not None:
        tensors["camera_px"] = pairs.camera_px.detach().contiguous().cpu()
    metadata = {"format": ODE_PAIRS_FORMAT, **{k: json.dumps(v) for k, v in pairs.metadata.items()}}
    try:
        with atomic_path(path, suffixes=SAFETENSORS_SUFFIXES) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as err:
        raise CheckpointError(f"could not write ODE pairs {path}: {err}") from err
    return path


def load_ode_pairs(path: str | Path) -> ODEPairs:
    """Read a file written by :func:`save_ode_pairs`; missing, corrupt or foreign files:
    CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ODE pairs file not found: {path} (write one with `mag train "
                              "ode-pairs`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"ODE pairs file {path} is corrupt or not a safetensors file ({err})"
        ) from err
    if raw.get("format") != ODE_PAIRS_FORMAT:
        raise CheckpointError(f"{path} is not an ODE pairs file (format {raw.get('format')!r}, "
                              "expected"
                              f" {ODE_PAIRS_FORMAT!r})")
    missing = [name for name in _REQUIRED if name not in tensors]
    if missing:
        raise CheckpointError(f"ODE pairs file {path} lacks {', '.join(missing)}")
    metadata = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    pairs = ODEPairs(**{name: tensors[name] for name in _REQUIRED},
                     camera_px=tensors.get("camera_px"), metadata=metadata)
    return pairs.validate(str(path))


def few_step_indices(scheduler: FlowMatchScheduler, num_steps: int) -> list[int]:
    """Where the few-step levels fall on the ``num_steps``-step Euler grid (grid index of each
    level).

    Both lists are the same shift applied to ``1 - i / num_steps`` and to ``d /
    num_train_timesteps``, so a level lies on the grid iff ``d * num_steps`` is a multiple of
    ``num_train_timesteps``.
    """
    scale = scheduler.config.num_train_timesteps
    levels = scheduler.config.denoising_steps
    off_grid = [d for d in levels if (d * num_steps) % scale]
    if num_steps < 1 or off_grid:
        raise InputError(f"{num_steps} Euler steps do not land on the few-step levels "
                         f"{list(levels)}"
                         f" (of {scale}); use a step count that makes every level * steps / "
                         f"{scale} whole,"
                         f" e.g. {_smallest_grid(levels, scale)} or a multiple of it")
    return [num_steps - d * num_steps // scale for d in levels]


def _smallest_grid(levels: tuple[int, ...], scale: int) -> int:
    return next(s for s in range(1, scale + 1) if all((d * s) % scale == 0 for d in levels))


@torch.no_grad()
def sample_ode_trajectory(model: torch.nn.Module, scheduler: FlowMatchScheduler, noise: Tensor,
                          context: Tensor, uncond_context: Tensor, num_steps: int, *,
                          guidance_scale: float = NO_GUIDANCE,
                          width_offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Integrate the teacher's guided probability-flow ODE from ``noise`` with Euler steps.

    Args:
        model: the bidirectional teacher, called on whole clips.
        noise: ``[B, F, C, H, W]`` the state at t = 1000.
        context / uncond_context: ``[B, L, text_dim]`` prompt and empty-prompt embeddings.
        num_steps: Euler steps over :meth:`FlowMatchScheduler.sampling_timesteps` (see
            :func:`few_step_indices` for the counts that land on the few-step levels).
        guidance_scale: ``v_u + s (v_c - v_u)`` (1 = off).
        width_offsets: ``[B, F]`` camera positions in patches (camera-anchored teachers).

    Returns:
        ``trajectory [B, K, F, C, H, W]`` (the state at each few-step level) and ``x0 [B, F, C, H,
        W]``.
    """
    record = few_step_indices(scheduler, num_steps)
    timesteps = scheduler.sampling_timesteps(num_steps).to(noise.device)
    x = noise
    states: dict[int, Tensor] = {}
    for i in range(num_steps):
        if i in record:
            states[i] = x
        t = timesteps[i].expand(x.shape[0])
        t_next = timesteps[i + 1].expand_as(t) if i + 1 < num_steps else torch.zeros_like(t)
        velocity = _velocity(model, scheduler, x, t, context, width_offsets)
        if guidance_scale != NO_GUIDANCE:
            uncond = _velocity(model, scheduler, x, t, uncond_context, width_offsets)
            velocity = uncond + guidance_scale * (velocity - uncond)
        x = scheduler.step_euler(velocity, x, t, t_next)
    return torch.stack([states[i] for i in record], dim=1), x


def _velocity(model: torch.nn.Module, scheduler: FlowMatchScheduler, x: Tensor, t: Tensor,
              context: Tensor, width_offsets: Tensor | None) -> Tensor:
    return scheduler.to_velocity(model(x, t, context, width_offsets=width_offsets), x, t)


def ode_regression_loss(model: torch.nn.Module, scheduler: FlowMatchScheduler, trajectory: Tensor,
                        x0: Tensor, context: Tensor, frames_per_block: int, level_index: Tensor,
                        width_offsets: Tensor | None = None) -> LossOutput:
    """MSE between the causal student's x0-prediction from trajectory points and the teacher's
    endpoint.

    Args:
        trajectory: ``[B, K, F, C, H, W]`` teacher states at the few-step levels
            (``scheduler.few_step_timesteps()``); ``x0``: ``[B, F, C, H, W]`` their endpoint.
        context: ``[B, L, text_dim]``; ``level_index``: ``[B, F / frames_per_block]`` long in ``[0,
        K)``,
            the level each block is taken at; ``width_offsets``: ``[B, F]`` camera positions in
            patches.

    Returns:
        ``loss`` (mean) and ``per_element`` ``[B, F, C, H, W]`` over the noisy half.
    """
    batch, levels, num_frames = trajectory.shape[:3]
    if tuple(trajectory.shape) != (batch, levels, *x0.shape[1:]) or x0.shape[0] != batch:
        raise InputError(f"trajectory {list(trajectory.shape)} must be [B, K, *x0.shape[1:]] for x0"
                         f" {list(x0.shape)}")
    if num_frames % frames_per_block or tuple(level_index.shape) != (
        batch,
        num_frames // frames_per_block,
    ):
        raise InputError(f"level_index must be [{batch}, {num_frames} / {frames_per_block}] (one "
                         "level per"
                         f" block), got {list(level_index.shape)}")
    # [B, F]
    frame_level = level_index.to(trajectory.device).repeat_interleave(frames_per_block, dim=1)
    gather = frame_level[:, None, :, None, None, None].expand(batch, 1, *trajectory.shape[2:])
    x_t = trajectory.gather(1, gather)[:, 0]
    t_frame = scheduler.few_step_timesteps().to(trajectory.device)[frame_level]
    mask = teacher_forcing_mask(num_frames, frames_per_block, device=x0.device)
    out = clean_noisy_forward(model, x0, x_t, t_frame, context, mask, width_offsets=width_offsets)
    prediction = scheduler.to_x0(out, x_t, t_frame)
    per_element = (prediction.float() - x0.float()) ** 2
    return LossOutput(per_element.mean(), per_element.detach())
