"""Self-Forcing DMD with a critic, and MAG's history loss (paper §4.2.1).

A generator step rolls the student out, noises the sample at a DMD timestep, and pushes it along ``g
= (x0_fake - x0_real) / mean|x - x0_real|`` (teacher with guidance vs critic, both without
gradient); the critic learns by flow matching on detached samples (:class:`DMDUpdateSchedule`). The
history loss is the same loss on a rollout whose later chunks used the empty text. Guidance is
``x0_uncond + s * (x0_cond - x0_uncond)``; every random draw comes in as an argument. The step by
step account, teacher-length windows and the guidance convention: docs/training.md, "Training
chain".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mag.config import SchedulerConfig
from mag.errors import ConfigError, InputError
from mag.objectives.flow_matching import LossOutput, teacher_flow_matching_loss
from mag.pipelines.rollout import BlockContexts, ContextSource
from mag.schedulers import FlowMatchScheduler

__all__ = ["HISTORY_MODES", "DMDLossOutput", "DMDStepConfig", "DMDUpdateSchedule", "HistoryMode",
           "ScoreFn", "combine", "critic_flow_matching_loss", "dmd_generator_loss", "dmd_gradient",
           "draw_history_choice", "history_block_contexts", "history_loss", "num_score_windows",
           "score_windows", "x0_predictor"]

ScoreFn = Callable[[Tensor, Tensor, ContextSource], Tensor]
HistoryMode = Literal["weight", "probability"]
HISTORY_MODES: tuple[str, ...] = ("weight", "probability")

# Self-Forcing's real-score guidance 3.0 in its ``cond + 3 (cond - uncond)`` form, in ours.
SELF_FORCING_GUIDANCE_SCALE = 4.0
# Self-Forcing's ``dfake_gen_update_ratio``.
SELF_FORCING_CRITIC_STEPS = 5
# Latent frames of the Wan2.1 teacher's clips (81 video frames).
SELF_FORCING_TEACHER_FRAMES = 21
# MAG's released recipe: a later chunk is generated with the empty text with probability 0.8.
MAG_HISTORY_PROBABILITY = 0.8
# Guidance scale at which the unconditional teacher pass is skipped.
NO_GUIDANCE = 1.0
# Floor of the per-sample normaliser mean|x - x0_real| (a perfect teacher match would divide by 0).
MIN_DMD_NORMALISER = 1e-12


def x0_predictor(model: torch.nn.Module, scheduler: FlowMatchScheduler) -> ScoreFn:
    """Wrap a DiT as a score: ``(x_t, t, context) -> x0``, positions ``0..F-1`` (a window is its own
    clip)."""

    def predict(x_t: Tensor, t: Tensor, context: ContextSource) -> Tensor:
        return scheduler.to_x0(model(x_t, t, context), x_t, t)

    return predict


# ---------------------------------------------------------------------------------------------
# Configuration and update schedule


@dataclass(frozen=True)
class DMDStepConfig:
    """Hyper-parameters of one DMD generator / critic step.

    Attributes:
        guidance_scale: CFG of the real score, ``x0_u + s (x0_c - x0_u)`` (Self-Forcing's 3.0 is 4.0
        here). critic_steps_per_generator_step: critic updates per generator update (Self-Forcing:
        5). min_timestep / max_timestep: clamp of the DMD (and critic) timesteps; take them from the
            scheduler config with :meth:`for_scheduler`.
        history_lambda: λ in ``∇L = (1-λ)∇L_DMD + λ∇L_history``. history_mode: ``weight`` (both
        losses every step) or ``probability`` (one loss per step,
            the history loss with probability λ).
        teacher_frames: clip length the teacher (and critic) score; longer rollouts go in windows.
        window_overlap_frames: frames a window shares with the previous one (MAG: one block; 0:
        disjoint).
    """

    guidance_scale: float = SELF_FORCING_GUIDANCE_SCALE
    critic_steps_per_generator_step: int = SELF_FORCING_CRITIC_STEPS
    min_timestep: float = SchedulerConfig.min_timestep
    max_timestep: float = SchedulerConfig.max_timestep
    history_lambda: float = MAG_HISTORY_PROBABILITY
    history_mode: HistoryMode = "probability"
    teacher_frames: int = SELF_FORCING_TEACHER_FRAMES
    window_overlap_frames: int = 0

    @classmethod
    def for_scheduler(cls, scheduler: SchedulerConfig, **overrides: object) -> DMDStepConfig:
        """A config whose timestep clamp is the scheduler config's ``[min_timestep,
        max_timestep]``."""
        fields = {"min_timestep": scheduler.min_timestep, "max_timestep": scheduler.max_timestep,
                  **overrides}
        return cls(**fields).validate()  # type: ignore[arg-type]

    def validate(self) -> DMDStepConfig:
        if self.guidance_scale <= 0:
            raise ConfigError("dmd.guidance_scale must be > 0 (1 = off), got "
                              f"{self.guidance_scale}")
        if self.critic_steps_per_generator_step < 1:
            raise ConfigError("dmd.critic_steps_per_generator_step must be >= 1, got"
                              f" {self.critic_steps_per_generator_step}")
        if not 0 <= self.min_timestep < self.max_timestep:
            raise ConfigError("dmd needs 0 <= min_timestep < max_timestep, got "
                              f"{self.min_timestep},"
                              f" {self.max_timestep}")
        if not 0 <= self.history_lambda <= 1:
            raise ConfigError(f"dmd.history_lambda must be in [0, 1], got {self.history_lambda}")
        if self.history_mode not in HISTORY_MODES:
            raise ConfigError(f"dmd.history_mode must be one of {', '.join(HISTORY_MODES)}, got"
                              f" {self.history_mode!r}")
        if self.teacher_frames < 1 or not 0 <= self.window_overlap_frames < self.teacher_frames:
            raise ConfigError("dmd needs teacher_frames >= 1 and 0 <= window_overlap_frames <"
                              f" teacher_frames, got {self.teacher_frames}, "
                              f"{self.window_overlap_frames}")
        return self

    def draw_timesteps(self, scheduler: FlowMatchScheduler, batch_size: int,
                       generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
        """DMD / critic timesteps ``[B]``: uniform noise level, shifted, clamped to this config's
        range."""
        t = scheduler.sample_training_timesteps((batch_size,), generator, device)
        return t.clamp(self.min_timestep, self.max_timestep)


@dataclass(frozen=True)
class DMDUpdateSchedule:
    """Which networks update at optimizer step ``k``: the critic always, the generator every n-th
    step.

    As in Self-Forcing, the generator updates at ``k % n == 0`` (steps 0, n, 2n, ...), so over any n
    consecutive steps the critic makes n updates and the generator one.
    """

    critic_steps_per_generator_step: int = SELF_FORCING_CRITIC_STEPS

    def __post_init__(self) -> None:
        if self.critic_steps_per_generator_step < 1:
            raise ConfigError("critic_steps_per_generator_step must be >= 1, got"
                              f" {self.critic_steps_per_generator_step}")

    @classmethod
    def from_config(cls, config: DMDStepConfig) -> DMDUpdateSchedule:
        return cls(config.critic_steps_per_generator_step)

    def generator_updates(self, step: int) -> bool:
        return step % self.critic_steps_per_generator_step == 0

    def critic_updates(self, step: int) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# Teacher-length windows


def num_score_windows(num_frames: int, window_frames: int, overlap_frames: int = 0) -> int:
    """How many windows of ``window_frames`` (sharing ``overlap_frames``) tile ``num_frames``
    exactly."""
    if window_frames < 1 or not 0 <= overlap_frames < window_frames:
        raise InputError("score windows need window_frames >= 1 and 0 <= overlap_frames < "
                         "window_frames,"
                         f" got {window_frames}, {overlap_frames}")
    stride = window_frames - overlap_frames
    if num_frames < window_frames or (num_frames - window_frames) % stride:
        raise InputError(f"a rollout of {num_frames} frames does not split into windows of "
                         f"{window_frames}"
                         f" frames overlapping by {overlap_frames}; use {window_frames} + "
                         f"k*{stride} frames")
    return 1 + (num_frames - window_frames) // stride


def score_windows(x: Tensor, window_frames: int, overlap_frames: int = 0) -> Tensor:
    """Split a long rollout into the clips the teacher scores: ``[B, N, ...] -> [W, B,
    window_frames, ...]``.

    Window ``i`` holds frames ``i*(window_frames - overlap_frames) ...``. Each window is scored as
    its own clip, so the teacher (bidirectional, trained on ``window_frames``-frame clips) sees RoPE
    positions ``0..window_frames-1`` rather than the stream's absolute positions. Frames a window
    shares with the previous one (MAG carries the last block of the previous chunk) are detached in
    the later window, so every frame takes its gradient from the first window that holds it.
    """
    if x.ndim < 2:
        raise InputError(f"x must be [B, F, ...], got {list(x.shape)}")
    count = num_score_windows(x.shape[1], window_frames, overlap_frames)
    stride = window_frames - overlap_frames
    windows = []
    for i in range(count):
        window = x[:, i * stride:i * stride + window_frames]
        if i and overlap_frames:
            window = torch.cat([window[:, :overlap_frames].detach(), window[:, overlap_frames:]],
                               dim=1)
        windows.append(window)
    return torch.stack(windows)


def _windows(x: Tensor, window_frames: int | None, overlap_frames: int) -> Tensor:
    if window_frames is None:
        if overlap_frames:
            raise InputError("overlap_frames needs window_frames")
        return x[None]
    return score_windows(x, window_frames, overlap_frames)


def _window_draws(windows: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Per-window timesteps ``[W, B]`` and noise ``[W, B, Fw, ...]`` (like ``x`` is fine for one
    window)."""
    count, batch = windows.shape[:2]
    if noise.shape == windows.shape[1:] and count == 1:
        noise = noise[None]
    if noise.shape != windows.shape:
        raise InputError(f"noise must be {list(windows.shape)} (one draw per scored window), got"
                         f" {list(noise.shape)}")
    if t.shape == (batch,):
        t = t.expand(count, batch)
    if t.shape != (count, batch):
        raise InputError(f"t must be [{batch}] or [{count}, {batch}], got {list(t.shape)}")
    return t, noise


# ---------------------------------------------------------------------------------------------
# DMD generator loss


@dataclass
class DMDLossOutput:
    """``loss``: scalar to back-propagate into the generator; ``gradient``: the DMD direction ``g``
    per scored window ``[W, B, Fw, C, H, W]`` (detached, for logging |g|); ``sample``: the scored
    rollout ``[B, F, C, H, W]`` detached (e.g. for the critic)."""

    loss: Tensor
    gradient: Tensor
    sample: Tensor


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD direction ``g = (x0_fake - x0_real) / mean|x - x0_real|`` (DMD eq. 7 with eq. 8's
    normaliser).

    All ``[B, ...]``; the normaliser is per sample, over every non-batch dim, floored at
    :data:`MIN_DMD_NORMALISER` so a perfect teacher match cannot divide by zero.
    """
    if not x.shape == x0_real.shape == x0_fake.shape:
        raise InputError(f"x {list(x.shape)}, x0_real {list(x0_real.shape)} and x0_fake"
                         f" {list(x0_fake.shape)} must have the same shape")
    dims = tuple(range(1, x.ndim))
    normaliser = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(MIN_DMD_NORMALISER)
    return (x0_fake - x0_real) / normaliser


def _guided(real_score_fn: ScoreFn, x_t: Tensor, t: Tensor, context: ContextSource,
            uncond_context: ContextSource | None, guidance_scale: float) -> Tensor:
    cond = real_score_fn(x_t, t, context)
    if guidance_scale == NO_GUIDANCE:
        return cond
    if uncond_context is None:
        raise InputError(f"guidance_scale={guidance_scale} needs uncond_context (the negative or "
                         "empty"
                         " prompt)")
    uncond = real_score_fn(x_t, t, uncond_context)
    return uncond + guidance_scale * (cond - uncond)


def _dmd_loss_on_windows(windows: Tensor, real_score_fn: ScoreFn, fake_score_fn: ScoreFn,
                         scheduler: FlowMatchScheduler, t: Tensor, noise: Tensor,
                         context: ContextSource, uncond_context: ContextSource | None,
                         guidance_scale: float) -> tuple[Tensor, Tensor]:
    """Loss and ``g`` over windows ``[W, B, Fw, ...]`` with draws ``t: [W, B]``, ``noise`` like
    windows."""
    gradients = []
    with torch.no_grad():
        for window, t_w, noise_w in zip(windows, t, noise, strict=True):
            x_t = scheduler.add_noise(window.detach(), noise_w, t_w)
            x0_real = _guided(real_score_fn, x_t, t_w, context, uncond_context, guidance_scale)
            x0_fake = fake_score_fn(x_t, t_w, context)
            gradients.append(dmd_gradient(window.detach().float(), x0_real.float(),
                                          x0_fake.float()))
    g = torch.stack(gradients)
    x = windows.float()
    loss = 0.5 * ((x - (x - g).detach()) ** 2).mean()
    return loss, g


def dmd_generator_loss(x: Tensor, real_score_fn: ScoreFn, fake_score_fn: ScoreFn,
                       scheduler: FlowMatchScheduler, t: Tensor, noise: Tensor, *,
                       context: ContextSource,
                       uncond_context: ContextSource | None = None,
                       guidance_scale: float = NO_GUIDANCE,
                       window_frames: int | None = None, overlap_frames: int = 0) -> DMDLossOutput:
    """DMD generator loss ``0.5 * mean((x - sg(x - g))^2)``: d loss / d x = ``g / (scored
    elements)``.

    Args:
        x: ``[B, F, C, H, W]`` the student rollout (carrying the generator's graph). real_score_fn:
        frozen teacher as ``(x_t, t, context) -> x0``, guided with ``uncond_context``.
        fake_score_fn: the critic, conditional only (no guidance, as in Self-Forcing). t: ``[B]``
        DMD timesteps (:meth:`DMDStepConfig.draw_timesteps`), or ``[W, B]`` one per window. noise:
        ``[W, B, window_frames, C, H, W]`` (like ``x`` when there is one window). context: the
        clip's text; ``uncond_context``: the negative / empty prompt for guidance. window_frames:
        teacher clip length (None: ``x`` is one clip); see :func:`score_windows`.
    """
    windows = _windows(x, window_frames, overlap_frames)
    t, noise = _window_draws(windows, t, noise)
    loss, g = _dmd_loss_on_windows(windows, real_score_fn, fake_score_fn, scheduler, t, noise,
                                   context, uncond_context, guidance_scale)
    return DMDLossOutput(loss, g, x.detach())


# ---------------------------------------------------------------------------------------------
# Critic


def critic_flow_matching_loss(critic: torch.nn.Module, scheduler: FlowMatchScheduler,
                              x_detached: Tensor,
                              context: ContextSource, t: Tensor, noise: Tensor, *,
                              window_frames: int | None = None,
                              overlap_frames: int = 0) -> LossOutput:
    """Train the critic like the teacher, on student samples: the fake score tracks the student's
    law.

    Args:
        x_detached: ``[B, F, C, H, W]`` rollout (detached here anyway: no gradient reaches the
        generator). t: ``[B]`` (or ``[W, B]``) timesteps drawn like the DMD ones; noise like
        :func:`dmd_generator_loss`.
    Returns:
        ``loss``: mean over the windows; ``per_element``: ``[B, W * window_frames, C, H, W]``,
        windows in order.
    """
    windows = _windows(x_detached.detach(), window_frames, overlap_frames)
    t, noise = _window_draws(windows, t, noise)
    losses = [teacher_flow_matching_loss(critic, scheduler, window, context, noise_w, t_w)
              for window, t_w, noise_w in zip(windows, t, noise, strict=True)]
    loss = torch.stack([out.loss for out in losses]).mean()
    return LossOutput(loss, torch.cat([out.per_element for out in losses], dim=1))


# ---------------------------------------------------------------------------------------------
# History loss and the λ mix


def history_block_contexts(context: ContextSource, empty_context: ContextSource, *,
                           frames_per_block: int,
                           first_chunk_frames: int) -> Callable[[int], ContextSource]:
    """Per-block prompts of a history rollout: the real text for the first chunk, the EMPTY text
    after.

    ``first_chunk_frames`` is the first scored window (the teacher's length); it must hold whole
    blocks.
    """
    if frames_per_block < 1 or first_chunk_frames < 1 or first_chunk_frames % frames_per_block:
        raise InputError(f"the first chunk ({first_chunk_frames} frames) must hold whole blocks of"
                         f" {frames_per_block} frames")
    first_chunk_blocks = first_chunk_frames // frames_per_block

    def block_context(block: int) -> ContextSource:
        return context if block < first_chunk_blocks else empty_context

    return block_context


def history_loss(rollout: Callable[[BlockContexts], Tensor], real_score_fn: ScoreFn,
                 fake_score_fn: ScoreFn,
                 scheduler: FlowMatchScheduler, t: Tensor, noise: Tensor, *, context: ContextSource,
                 empty_context: ContextSource, frames_per_block: int, window_frames: int,
                 overlap_frames: int = 0, uncond_context: ContextSource | None = None,
                 guidance_scale: float = NO_GUIDANCE) -> DMDLossOutput:
    """MAG's history loss ``L_history`` (paper §4.2.1): DMD on chunks generated from history alone.

    The student rolls out with the real text for the first chunk (window) and the EMPTY text for
    every later chunk, so what it draws there can only come from its memory of the first; the
    teacher and critic score those later windows with the clip's REAL text. This removes the
    solution in which the generator ignores its history and follows the text.

    Args:
        rollout: ``contexts -> x [B, F, C, H, W]``, e.g.
            ``lambda ctx: self_forcing_rollout(gen, sched, context, context_per_block=ctx, ...)``;
            it is called once with :func:`history_block_contexts`.
        t: ``[B]`` or ``[W - 1, B]``; noise: ``[W - 1, B, window_frames, C, H, W]`` (the scored
        windows,
            every window but the first).
        window_frames, overlap_frames: teacher windows (:func:`score_windows`); the rollout needs >=
        2.
    """
    contexts = history_block_contexts(context, empty_context, frames_per_block=frames_per_block,
                                      first_chunk_frames=window_frames)
    x = rollout(contexts)
    windows = score_windows(x, window_frames, overlap_frames)
    if windows.shape[0] < 2:
        raise InputError("the history loss scores chunks after the first; a rollout of "
                         f"{x.shape[1]} frames"
                         f" holds one window of {window_frames}")
    later = windows[1:]
    t, noise = _window_draws(later, t, noise)
    loss, g = _dmd_loss_on_windows(later, real_score_fn, fake_score_fn, scheduler, t, noise,
                                   context, uncond_context, guidance_scale)
    return DMDLossOutput(loss, g, x.detach())


def draw_history_choice(history_lambda: float, generator: torch.Generator | None = None) -> bool:
    """Bernoulli(λ): whether this step uses the history loss in ``probability`` mode (one host
    bool)."""
    return bool(torch.rand((), generator=generator) < history_lambda)


def combine(l_dmd: Tensor | None, l_hist: Tensor | None, lam: float, mode: HistoryMode,
            use_history: bool | None = None) -> Tensor:
    """The generator objective ``∇L = (1-λ)∇L_DMD + λ∇L_history`` (paper §4.2.1).

    ``weight``: returns ``(1-λ) L_DMD + λ L_history`` (both losses needed). ``probability``: returns
    ``L_history`` when ``use_history`` (drawn by the caller with :func:`draw_history_choice`, P = λ)
    and ``L_DMD`` otherwise; only the chosen loss is needed (pass None for the other), and the
    expected gradient equals the weighted one (MAG's released code: empty text with probability
    0.8).
    """
    if not 0 <= lam <= 1:
        raise InputError(f"λ must be in [0, 1], got {lam}")
    if mode == "weight":
        if l_dmd is None or l_hist is None:
            raise InputError("combine(mode='weight') needs both l_dmd and l_hist")
        return (1 - lam) * l_dmd + lam * l_hist
    if mode == "probability":
        if use_history is None:
            raise InputError("combine(mode='probability') needs use_history (draw it with"
                             " draw_history_choice(λ, generator))")
        chosen = l_hist if use_history else l_dmd
        if chosen is None:
            raise InputError(f"combine chose {'l_hist' if use_history else 'l_dmd'}, which was "
                             "not given")
        return chosen
    raise InputError(f"unknown history mode {mode!r}; valid modes: {', '.join(HISTORY_MODES)}")
