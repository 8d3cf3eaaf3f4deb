"""Flow-matching schedule in the Wan convention.

``x_s = (1 - s) * x0 + s * eps`` with noise level ``s`` in [0, 1] and timestep ``t = 1000 * s``. The
network predicts the velocity ``v = eps - x0`` (so ``x0 = x_s - s * v``), or -- for presets with
``prediction="x0"`` -- the clean latent directly, converted here. Sampling warps noise levels with
the shift ``s' = shift * s / (1 + (shift - 1) * s)``; few-step generation walks a fixed timestep
list, predicting x0 at each step and re-noising it to the next level with fresh noise
(Self-Forcing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mag.config import PredictionType, SchedulerConfig
from mag.errors import InputError

# Below this noise level an x0 -> velocity conversion divides by ~0; clamp the denominator.
_MIN_SIGMA_FOR_VELOCITY = 1e-3


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """Timestep shift ``s' = shift*s / (1 + (shift-1)*s)`` (more steps at high noise for shift >
    1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64 if not isinstance(sigma, Tensor) else None)
    return shift * sigma / (1 + (shift - 1) * sigma)


def _expand(sigma: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-sample ``[B]`` or per-frame ``[B, F]`` noise levels over ``like: [B, F,
    ...]``."""
    sigma = sigma.to(like.dtype)
    return sigma.reshape(*sigma.shape, *([1] * (like.dim() - sigma.dim())))


class FlowMatchScheduler:
    """Noise levels, noising and parameterisation conversions for one preset."""

    def __init__(self, config: SchedulerConfig, prediction: PredictionType = "velocity") -> None:
        config.validate()
        self.config = config
        self.prediction = prediction

    # ---------------------------------------------------------------- timesteps
    @property
    def scale(self) -> float:
        return float(self.config.num_train_timesteps)

    def few_step_timesteps(self) -> Tensor:
        """The shifted few-step list, e.g. [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625] at
        shift 5."""
        steps = torch.tensor(self.config.denoising_steps, dtype=torch.float64) / self.scale
        return (shift_sigma(steps, self.config.shift) * self.scale).to(torch.float32)

    def sampling_timesteps(self, num_steps: int) -> Tensor:
        """``num_steps`` shifted timesteps from 1000 down (exclusive of 0) for many-step teacher
        sampling."""
        if num_steps < 1:
            raise InputError(f"num_steps must be >= 1, got {num_steps}")
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return (shift_sigma(sigmas, self.config.shift) * self.scale).to(torch.float32)

    def sample_training_timesteps(self, shape: tuple[int, ...],
                                  generator: torch.Generator | None = None,
                                  device: torch.device | str = "cpu") -> Tensor:
        """Uniform noise levels warped by the shift (flow-matching training), as timesteps in (0,
        1000)."""
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        return (shift_sigma(u, self.config.shift) * self.scale).to(torch.float32)

    def sample_dmd_timesteps(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                             device: torch.device | str = "cpu") -> Tensor:
        """DMD timesteps: uniform, shifted, clamped to [min_timestep, max_timestep]."""
        t = self.sample_training_timesteps(shape, generator, device)
        return t.clamp(self.config.min_timestep, self.config.max_timestep)

    def sigma(self, timestep: Tensor) -> Tensor:
        return timestep / self.scale

    # ---------------------------------------------------------------- noising
    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """``x_s = (1-s) x0 + s eps``; ``timestep`` is ``[B]`` or ``[B, F]`` over ``x0: [B, F,
        ...]``."""
        if x0.shape != noise.shape:
            raise InputError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the "
                             "same shape")
        s = _expand(self.sigma(timestep), x0)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        """The flow-matching regression target ``v = eps - x0``."""
        return noise - x0

    # ---------------------------------------------------------------- conversions
    def to_x0(self, output: Tensor, x_t: Tensor, timestep: Tensor) -> Tensor:
        """Clean-latent estimate from the raw network output under the preset's parameterisation."""
        if self.prediction == "x0":
            return output
        return x_t - _expand(self.sigma(timestep), x_t) * output

    def to_velocity(self, output: Tensor, x_t: Tensor, timestep: Tensor) -> Tensor:
        """Velocity estimate ``v = (x_t - x0) / s`` from the raw network output."""
        if self.prediction == "velocity":
            return output
        s = _expand(self.sigma(timestep), x_t).clamp_min(_MIN_SIGMA_FOR_VELOCITY)
        return (x_t - output) / s

    def x0_to_velocity(self, x0: Tensor, x_t: Tensor, timestep: Tensor) -> Tensor:
        s = _expand(self.sigma(timestep), x_t).clamp_min(_MIN_SIGMA_FOR_VELOCITY)
        return (x_t - x0) / s

    def velocity_to_x0(self, velocity: Tensor, x_t: Tensor, timestep: Tensor) -> Tensor:
        return x_t - _expand(self.sigma(timestep), x_t) * velocity

    # ---------------------------------------------------------------- sampling steps
    def step_euler(self, velocity: Tensor, x_t: Tensor, timestep: Tensor,
                   next_timestep: Tensor) -> Tensor:
        """One deterministic Euler step of the probability-flow ODE from ``timestep`` to
        ``next_timestep``."""
        ds = _expand(self.sigma(next_timestep) - self.sigma(timestep), x_t)
        return x_t + ds * velocity

    def renoise(self, x0: Tensor, next_timestep: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        """Few-step sampling: put an x0 estimate back at the next noise level with fresh noise."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.add_noise(x0, noise, next_timestep)
