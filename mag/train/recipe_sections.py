"""The DMD, horizon and parallelism sections of a training recipe (``[dmd]``, ``[horizon]``,
``[parallel]``).

Typed frozen dataclasses, validated on construction by :mod:`mag.train.recipe`, which re-exports
them. ``[parallel]`` is the only section a run may change on resume besides cadence fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.objectives.dmd import (
    HISTORY_MODES,
    SELF_FORCING_CRITIC_STEPS,
    SELF_FORCING_GUIDANCE_SCALE,
    DMDStepConfig,
    HistoryMode,
    num_score_windows,
)

# Self-Forcing's AdamW betas for the critic (and the generator) in the DMD stage.
SELF_FORCING_DMD_BETAS = (0.0, 0.999)
# KV-cache policies of DMD rollouts: Self-Forcing's full cache, MAG's memory-model-written
# compressed cache, and the same frames written by the generator (MAG's "w/o stage 1" ablation).
RolloutPolicy = Literal["full", "mag", "downsample"]
ROLLOUT_POLICIES: tuple[str, ...] = ("full", "mag", "downsample")
# How teacher and critic score a window: one bidirectional pass (Self-Forcing's teacher), or block
# by block given the window's clean blocks before (a teacher-forced causal model).
ScoreMode = Literal["bidirectional", "teacher_forced"]
SCORE_MODES: tuple[str, ...] = ("bidirectional", "teacher_forced")


@dataclass(frozen=True)
class DMDConfig:
    """Self-Forcing DMD (``objective.kind = "dmd"``): frozen teacher, trained critic, student
    rollouts.

    Attributes:
        teacher: the frozen real score (model file, checkpoint, registry name or official weights,
        e.g.
            a Wan2.1-T2V-1.3B folder).
        critic: initial weights of the fake score; empty: a trainable copy of the teacher.
        critic_lr: the critic's AdamW learning rate (warmed up like ``optim.lr``). critic_betas: the
        critic's AdamW betas (Self-Forcing: (0, 0.999)). critic_steps_per_generator_step: the critic
        updates every optimizer step, the generator every
            n-th (Self-Forcing: 5).
        guidance_scale: CFG of the real score, ``x0_u + s (x0_c - x0_u)`` (1 = off; Self-Forcing's
        3.0
            is 4.0 here).
        rollout_blocks: blocks the student generates per rollout; the rollout's frames
            (``rollout_blocks * frames_per_block``) must tile into teacher windows and fit
            ``data.clip_frames`` (the clips give prompts and camera tracks).
        teacher_frames: clip length the teacher and critic score (windows of the rollout).
        window_overlap_frames: frames a window shares with the previous one. history_lambda: λ of
        ``(1-λ) L_DMD + λ L_history`` (0: plain Self-Forcing DMD). history_mode: ``weight`` or
        ``probability`` (see :func:`mag.objectives.dmd.combine`). rollout_policy: KV-cache policy of
        every rollout (generator, history and critic rollouts):
            ``full`` keeps every frame (Self-Forcing); ``mag`` is MAG stage 2: the frozen
            ``memory_model`` writes each finished block's compressed K/V (sinks + each block's last
            frame) and the generator only reads them; ``downsample`` keeps the same frames written
            by the generator itself (the paper's "w/o stage 1" ablation).
        memory_model: the stage-1 memory model (a ``memory`` model file, checkpoint or registry
        name;
            its ``dit`` config must equal the recipe's). Required by, and only allowed with,
            ``mag``.
        score_mode: ``bidirectional`` (teacher and critic score a window in one full-attention
            pass: Self-Forcing's bidirectional teacher) or ``teacher_forced`` (each block scored
            given the window's clean blocks before it, and the critic trained so: a block-causal
            teacher such as ``tiny-causal-long``).
        grad_last_frames: 0: every block's exit step carries gradient; ``n > 0``: only blocks
        starting in
            the last ``n`` frames do (Self-Forcing-style detaching of earlier chunks, which bounds
            the activation memory of long rollouts), and windows with no such frame are not scored.
    """

    teacher: str = ""
    critic: str = ""
    critic_lr: float = 1e-4
    critic_betas: tuple[float, float] = SELF_FORCING_DMD_BETAS
    critic_steps_per_generator_step: int = SELF_FORCING_CRITIC_STEPS
    guidance_scale: float = SELF_FORCING_GUIDANCE_SCALE
    rollout_blocks: int = 2
    teacher_frames: int = 6
    window_overlap_frames: int = 0
    history_lambda: float = 0.0
    history_mode: HistoryMode = "weight"
    rollout_policy: RolloutPolicy = "full"
    memory_model: str = ""
    grad_last_frames: int = 0
    score_mode: ScoreMode = "bidirectional"

    def step_config(self, preset: Preset) -> DMDStepConfig:
        """The objective-level config (timestep clamp from the preset's scheduler); validates it."""
        return DMDStepConfig.for_scheduler(
            preset.scheduler, guidance_scale=self.guidance_scale,
            critic_steps_per_generator_step=self.critic_steps_per_generator_step,
            history_lambda=self.history_lambda, history_mode=self.history_mode,
            teacher_frames=self.teacher_frames, window_overlap_frames=self.window_overlap_frames)

    def validate(self, preset: Preset, clip_frames: int) -> None:
        if not self.teacher:
            raise ConfigError("objective.kind = 'dmd' needs dmd.teacher (a model file or registry "
                              "name)")
        if self.critic_lr <= 0:
            raise ConfigError(f"dmd.critic_lr must be > 0, got {self.critic_lr}")
        if len(self.critic_betas) != 2 or not all(0 <= b < 1 for b in self.critic_betas):
            raise ConfigError("dmd.critic_betas must be two values in [0, 1), got "
                              f"{self.critic_betas}")
        if self.rollout_blocks < 1:
            raise ConfigError(f"dmd.rollout_blocks must be >= 1, got {self.rollout_blocks}")
        if self.history_mode not in HISTORY_MODES:
            raise ConfigError(f"dmd.history_mode must be one of {', '.join(HISTORY_MODES)}, got"
                              f" {self.history_mode!r}")
        self.step_config(preset)
        fpb = preset.cache.frames_per_block
        frames = self.rollout_blocks * fpb
        if frames > clip_frames:
            raise ConfigError(f"dmd.rollout_blocks={self.rollout_blocks} makes {frames} frames, "
                              "more than"
                              f" data.clip_frames={clip_frames} (the clips give prompts and "
                              "camera tracks)")
        if self.teacher_frames % fpb:
            raise ConfigError(f"dmd.teacher_frames={self.teacher_frames} must be a multiple of "
                              "the block"
                              f" size {fpb}")
        try:
            windows = num_score_windows(frames, self.teacher_frames, self.window_overlap_frames)
        except InputError as err:
            raise ConfigError(f"dmd.rollout_blocks / dmd.teacher_frames: {err}") from err
        if self.history_lambda > 0 and windows < 2:
            raise ConfigError(f"dmd.history_lambda > 0 needs a rollout of >= 2 teacher windows; "
                              f"{frames} frames hold {windows} of "
                              f"dmd.teacher_frames={self.teacher_frames}")
        if self.score_mode not in SCORE_MODES:
            raise ConfigError(f"dmd.score_mode must be one of {', '.join(SCORE_MODES)}, got"
                              f" {self.score_mode!r}")
        self._validate_memory(frames, fpb)

    def _validate_memory(self, frames: int, frames_per_block: int) -> None:
        """The rollout policy, its memory model and the gradient horizon (MAG stage 2)."""
        if self.rollout_policy not in ROLLOUT_POLICIES:
            raise ConfigError(f"dmd.rollout_policy must be one of {', '.join(ROLLOUT_POLICIES)}, "
                              "got"
                              f" {self.rollout_policy!r}")
        if self.rollout_policy == "mag" and not self.memory_model:
            raise ConfigError("dmd.rollout_policy = 'mag' needs dmd.memory_model (the stage-1 "
                              "memory model"
                              " file or registry name, e.g. models/tiny-memory.safetensors); for "
                              "the 'w/o"
                              " stage 1' ablation use rollout_policy = 'downsample'")
        if self.memory_model and self.rollout_policy != "mag":
            raise ConfigError("dmd.memory_model is set but dmd.rollout_policy is "
                              f"{self.rollout_policy!r}:"
                              " only 'mag' lets the memory model write the cache; set "
                              "rollout_policy ="
                              " 'mag' or remove memory_model")
        if not 0 <= self.grad_last_frames <= frames or self.grad_last_frames % frames_per_block:
            raise ConfigError("dmd.grad_last_frames must be 0 (every block) or a multiple of the "
                              "block size"
                              f" {frames_per_block} up to the rollout's {frames} frames, got"
                              f" {self.grad_last_frames}")


@dataclass(frozen=True)
class HorizonConfig:
    """Memory past the training horizon (``objective.kind = "horizon"``): flow matching on blocks
    that read the two-tier memory (policy ``archive``) of long leave-and-return clips.

    Attributes:
        memory_model: the frozen stage-1 memory model that writes the cache (a ``memory`` model
            file, checkpoint or registry name; its ``dit`` config must equal the recipe's).
        return_blocks: the clip's last blocks scored every step (a loop clip's return: views
            last seen about a dwell earlier).
        other_blocks: blocks scored besides, drawn among the blocks after the sinks and before
            the return (one draw per micro-batch).
    """

    memory_model: str = ""
    return_blocks: int = 2
    other_blocks: int = 2

    def validate(self, preset: Preset, clip_frames: int) -> None:
        if not self.memory_model:
            raise ConfigError("objective.kind = 'horizon' needs horizon.memory_model (the stage-1 "
                              "memory model file or registry name, e.g. tiny-memory)")
        if self.return_blocks < 0 or self.other_blocks < 0 or not (self.return_blocks
                                                                   + self.other_blocks):
            raise ConfigError("horizon.return_blocks and horizon.other_blocks must be >= 0 and "
                              f"not both 0, got {self.return_blocks}, {self.other_blocks}")
        fpb = preset.cache.frames_per_block
        first = -(-preset.cache.memory_sink_frames // fpb)  # blocks holding the sinks
        if first + self.other_blocks + self.return_blocks > clip_frames // fpb:
            raise ConfigError(f"data.clip_frames={clip_frames} holds {clip_frames // fpb} blocks: "
                              f"too few for {first} sink block(s), horizon.other_blocks="
                              f"{self.other_blocks} and horizon.return_blocks="
                              f"{self.return_blocks}")


MixedPrecision = Literal["fp32", "bf16"]
MIXED_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
CheckpointFormat = Literal["file", "dcp"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("file", "dcp")


@dataclass(frozen=True)
class ParallelConfig:
    """How the networks are sharded, computed and checkpointed (:mod:`mag.train.mesh`,
    :mod:`mag.train.dcp`). Only ``mixed_precision`` changes the numbers (beyond reduction order), so
    a run may resume under another shard size, checkpointing or checkpoint format.

    Attributes:
        mixed_precision: ``fp32``, or ``bf16`` (FSDP2 gathers bf16 parameters and reduces gradients
        in
            float32; master weights, optimiser state and EMA stay float32). ``bf16`` shards even a
            single process (a one-rank group).
        activation_checkpointing: recompute each transformer block's activations in backward instead
            of keeping them (generator and critic; frozen networks run without gradient anyway).
        shard_size: ranks that shard one copy of the weights (the inner mesh dimension); the world
            size divided by it replicates (HSDP). 0: all ranks shard one copy (plain FSDP).
        checkpoint: ``file`` (one atomic safetensors file of full tensors, gathered on rank 0) or
            ``dcp`` (a ``torch.distributed.checkpoint`` folder written shard by shard by every
            rank).
    """

    mixed_precision: MixedPrecision = "fp32"
    activation_checkpointing: bool = False
    shard_size: int = 0
    checkpoint: CheckpointFormat = "file"

    def validate(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError("parallel.mixed_precision must be one of "
                              f"{', '.join(MIXED_PRECISIONS)},"
                              f" got {self.mixed_precision!r}")
        if self.checkpoint not in CHECKPOINT_FORMATS:
            raise ConfigError(f"parallel.checkpoint must be one of {', '.join(CHECKPOINT_FORMATS)},"
                              f" got {self.checkpoint!r}")
        if self.shard_size < 0:
            raise ConfigError("parallel.shard_size must be >= 0 (0: all ranks), got "
                              f"{self.shard_size}")
