"""Training recipes: typed dataclasses read from TOML files in ``recipes/``.

A recipe fixes everything a run depends on (preset and overrides, objective, optimiser, data), so a
checkpoint's stored recipe is enough to reproduce it. Resuming checks the stored recipe against the
current one: only ``loop.steps`` (train longer) and logging/checkpoint cadence may differ.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mag.config import Preset, get_preset, replace_nested
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
# KV-cache policies of DMD rollouts: Self-Forcing's full cache, MAG's memory-model-written compressed
# cache, and the same frames written by the generator (MAG's "w/o stage 1" ablation).
RolloutPolicy = Literal["full", "mag", "downsample"]
ROLLOUT_POLICIES: tuple[str, ...] = ("full", "mag", "downsample")

DATA_SOURCES: tuple[str, ...] = ("world", "prompts", "shards")

ObjectiveKind = Literal["teacher_fm", "causal_fm", "ode", "dmd", "memory"]
OBJECTIVES: tuple[str, ...] = ("teacher_fm", "causal_fm", "ode", "dmd", "memory")
# Objectives whose student is the block-causal generator (``teacher_fm`` trains the bidirectional teacher,
# ``memory`` the stage-1 memory model).
CAUSAL_OBJECTIVES: tuple[str, ...] = ("causal_fm", "ode", "dmd")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up, gradient clipping and an EMA of the weights."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 100
    ema_decay: float = 0.999

    def validate(self) -> None:
        if self.lr <= 0 or self.grad_clip <= 0 or self.warmup_steps < 0:
            raise ConfigError("optim.lr and optim.grad_clip must be > 0 and optim.warmup_steps >= 0")
        if not (0 <= self.ema_decay < 1) or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.ema_decay must be in [0, 1) and optim.betas two values in [0, 1)")


@dataclass(frozen=True)
class LoopConfig:
    """Step counts and cadence. ``batch_size`` is per optimiser step, split into ``grad_accum`` parts."""

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 3

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"loop.{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"loop.batch_size={self.batch_size} must be divisible by loop.grad_accum={self.grad_accum}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Panorama-world clips. ``world`` holds ``WorldConfig`` overrides (see ``mag.world``).

    Attributes:
        clip_frames: latent frames per training clip (a multiple of the block size).
        world: overrides of the world config (speeds, excursions, frame size, ...).
        text_mode: ``tokens`` (per-token MiniLM states) or ``pooled`` (one sentence vector).
        source: ``world`` (procedural clips), ``prompts`` (``data.prompts``, one prompt per line; the
            data-free DMD stages only, :class:`mag.data.PromptFileSource`) or ``shards`` (VAE latents
            of real videos from ``mag data encode``, :class:`mag.data.shards.LatentShardSource`).
        prompts: the prompt file of ``source = "prompts"``.
        shards: the shard folder of ``source = "shards"``.
        text_encoder_path: weights of a ``umt5`` text encoder (a diffusers Wan pipeline folder or a
            UMT5 encoder folder); ``MAG_PROMPT_TABLE`` (``mag text table``) may stand in for it.
    """

    clip_frames: int = 24
    world: dict[str, Any] = field(default_factory=dict)
    text_mode: Literal["tokens", "pooled"] = "pooled"
    source: Literal["world", "prompts", "shards"] = "world"
    prompts: str = ""
    shards: str = ""
    text_encoder_path: str = ""

    def validate(self, frames_per_block: int) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        if self.source == "prompts" and not self.prompts:
            raise ConfigError("data.source = 'prompts' needs data.prompts (a text file, one prompt per line)")
        if self.source == "shards" and not self.shards:
            raise ConfigError("data.source = 'shards' needs data.shards (a folder from `mag data encode`)")
        if self.clip_frames <= 0 or self.clip_frames % frames_per_block:
            raise ConfigError(
                f"data.clip_frames={self.clip_frames} must be a positive multiple of the block size"
                f" {frames_per_block}"
            )
        if self.text_mode not in ("tokens", "pooled"):
            raise ConfigError(f"data.text_mode must be 'tokens' or 'pooled', got {self.text_mode!r}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss, and its knobs.

    Attributes:
        kind: ``teacher_fm`` (bidirectional flow matching), ``causal_fm`` (teacher-forced
            block-causal flow matching on ``[clean ; noisy]`` sequences, CausVid-style init), ``ode``
            (the causal student regresses the teacher's ODE endpoint from its trajectory, Self-Forcing's
            init; needs ``ode.pairs``), ``dmd`` (Self-Forcing DMD with a critic; needs ``dmd.teacher``)
            or ``memory`` (the stage-1 memory model: reconstruct whole blocks from their compressed
            last frames, always with the empty prompt; ``init.model`` should be the generator).
        cfg_dropout: probability of replacing the prompt with the empty prompt (enables CFG and
            teaches the model to draw from history alone); flow-matching kinds only (``memory``
            always reads the empty prompt and ignores it).
        recall_window_frames: frames counted as "recent" for the recall-signal log: a pixel whose
            view was last seen more than this many frames ago is a recall pixel.
    """

    kind: ObjectiveKind = "causal_fm"
    cfg_dropout: float = 0.1
    recall_window_frames: int = 12

    def validate(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"objective.kind must be one of {', '.join(OBJECTIVES)}, got {self.kind!r}")
        if not 0 <= self.cfg_dropout <= 1:
            raise ConfigError(f"objective.cfg_dropout must be in [0, 1], got {self.cfg_dropout}")


@dataclass(frozen=True)
class InitConfig:
    """Where the trained model's initial weights come from.

    Attributes:
        model: a model file, training checkpoint (its EMA weights) or registry name, or official
            weights (a Wan2.1 or diffusers folder, a Self-Forcing / MAG checkpoint), loaded with
            :func:`mag.train.networks.load_network`; its ``dit`` config must equal the recipe's. Empty: random
            initialisation from ``loop.seed``. Read once at the start of a run, not on resume. A
            ``memory`` run should start from the generator whose blocks it will compress (docs/design.md §1);
            without one it trains from scratch and warns.
    """

    model: str = ""


@dataclass(frozen=True)
class ODEConfig:
    """The ``ode`` objective's data: a file written by ``mag train ode-pairs``.

    Attributes:
        pairs: safetensors file of teacher trajectories (:mod:`mag.objectives.ode`).
    """

    pairs: str = ""


@dataclass(frozen=True)
class DMDConfig:
    """Self-Forcing DMD (``objective.kind = "dmd"``): frozen teacher, trained critic, student rollouts.

    Attributes:
        teacher: the frozen real score (model file, checkpoint, registry name or official weights, e.g.
            a Wan2.1-T2V-1.3B folder).
        critic: initial weights of the fake score; empty: a trainable copy of the teacher.
        critic_lr: the critic's AdamW learning rate (warmed up like ``optim.lr``).
        critic_betas: the critic's AdamW betas (Self-Forcing: (0, 0.999)).
        critic_steps_per_generator_step: the critic updates every optimizer step, the generator every
            n-th (Self-Forcing: 5).
        guidance_scale: CFG of the real score, ``x0_u + s (x0_c - x0_u)`` (1 = off; Self-Forcing's 3.0
            is 4.0 here).
        rollout_blocks: blocks the student generates per rollout; the rollout's frames
            (``rollout_blocks * frames_per_block``) must tile into teacher windows and fit
            ``data.clip_frames`` (the clips give prompts and camera tracks).
        teacher_frames: clip length the teacher and critic score (windows of the rollout).
        window_overlap_frames: frames a window shares with the previous one.
        history_lambda: λ of ``(1-λ) L_DMD + λ L_history`` (0: plain Self-Forcing DMD).
        history_mode: ``weight`` or ``probability`` (see :func:`mag.objectives.dmd.combine`).
        rollout_policy: KV-cache policy of every rollout (generator, history and critic rollouts):
            ``full`` keeps every frame (Self-Forcing); ``mag`` is MAG stage 2: the frozen
            ``memory_model`` writes each finished block's compressed K/V (sinks + each block's last
            frame) and the generator only reads them; ``downsample`` keeps the same frames written by
            the generator itself (the paper's "w/o stage 1" ablation).
        memory_model: the stage-1 memory model (a ``memory`` model file, checkpoint or registry name;
            its ``dit`` config must equal the recipe's). Required by, and only allowed with, ``mag``.
        grad_last_frames: 0: every block's exit step carries gradient; ``n > 0``: only blocks starting in
            the last ``n`` frames do (Self-Forcing-style detaching of earlier chunks, which bounds the
            activation memory of long rollouts), and windows with no such frame are not scored.
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

    def step_config(self, preset: Preset) -> DMDStepConfig:
        """The objective-level config (timestep clamp from the preset's scheduler); validates it."""
        return DMDStepConfig.for_scheduler(
            preset.scheduler, guidance_scale=self.guidance_scale,
            critic_steps_per_generator_step=self.critic_steps_per_generator_step,
            history_lambda=self.history_lambda, history_mode=self.history_mode,
            teacher_frames=self.teacher_frames, window_overlap_frames=self.window_overlap_frames)

    def validate(self, preset: Preset, clip_frames: int) -> None:
        if not self.teacher:
            raise ConfigError("objective.kind = 'dmd' needs dmd.teacher (a model file or registry name)")
        if self.critic_lr <= 0:
            raise ConfigError(f"dmd.critic_lr must be > 0, got {self.critic_lr}")
        if len(self.critic_betas) != 2 or not all(0 <= b < 1 for b in self.critic_betas):
            raise ConfigError(f"dmd.critic_betas must be two values in [0, 1), got {self.critic_betas}")
        if self.rollout_blocks < 1:
            raise ConfigError(f"dmd.rollout_blocks must be >= 1, got {self.rollout_blocks}")
        if self.history_mode not in HISTORY_MODES:
            raise ConfigError(f"dmd.history_mode must be one of {', '.join(HISTORY_MODES)}, got"
                              f" {self.history_mode!r}")
        self.step_config(preset)
        fpb = preset.cache.frames_per_block
        frames = self.rollout_blocks * fpb
        if frames > clip_frames:
            raise ConfigError(f"dmd.rollout_blocks={self.rollout_blocks} makes {frames} frames, more than"
                              f" data.clip_frames={clip_frames} (the clips give prompts and camera tracks)")
        if self.teacher_frames % fpb:
            raise ConfigError(f"dmd.teacher_frames={self.teacher_frames} must be a multiple of the block"
                              f" size {fpb}")
        try:
            windows = num_score_windows(frames, self.teacher_frames, self.window_overlap_frames)
        except InputError as err:
            raise ConfigError(f"dmd.rollout_blocks / dmd.teacher_frames: {err}") from err
        if self.history_lambda > 0 and windows < 2:
            raise ConfigError(f"dmd.history_lambda > 0 needs a rollout of >= 2 teacher windows; "
                              f"{frames} frames hold {windows} of dmd.teacher_frames={self.teacher_frames}")
        self._validate_memory(frames, fpb)

    def _validate_memory(self, frames: int, frames_per_block: int) -> None:
        """The rollout policy, its memory model and the gradient horizon (MAG stage 2)."""
        if self.rollout_policy not in ROLLOUT_POLICIES:
            raise ConfigError(f"dmd.rollout_policy must be one of {', '.join(ROLLOUT_POLICIES)}, got"
                              f" {self.rollout_policy!r}")
        if self.rollout_policy == "mag" and not self.memory_model:
            raise ConfigError("dmd.rollout_policy = 'mag' needs dmd.memory_model (the stage-1 memory model"
                              " file or registry name, e.g. models/tiny-memory.safetensors); for the 'w/o"
                              " stage 1' ablation use rollout_policy = 'downsample'")
        if self.memory_model and self.rollout_policy != "mag":
            raise ConfigError(f"dmd.memory_model is set but dmd.rollout_policy is {self.rollout_policy!r}:"
                              " only 'mag' lets the memory model write the cache; set rollout_policy ="
                              " 'mag' or remove memory_model")
        if not 0 <= self.grad_last_frames <= frames or self.grad_last_frames % frames_per_block:
            raise ConfigError(f"dmd.grad_last_frames must be 0 (every block) or a multiple of the block size"
                              f" {frames_per_block} up to the rollout's {frames} frames, got"
                              f" {self.grad_last_frames}")


MixedPrecision = Literal["fp32", "bf16"]
MIXED_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
CheckpointFormat = Literal["file", "dcp"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("file", "dcp")


@dataclass(frozen=True)
class ParallelConfig:
    """How the networks are sharded, computed and checkpointed (:mod:`mag.train.mesh`,
    :mod:`mag.train.dcp`). Only ``mixed_precision`` changes the numbers (beyond reduction order), so a
    run may resume under another shard size, checkpointing or checkpoint format.

    Attributes:
        mixed_precision: ``fp32``, or ``bf16`` (FSDP2 gathers bf16 parameters and reduces gradients in
            float32; master weights, optimiser state and EMA stay float32). ``bf16`` shards even a
            single process (a one-rank group).
        activation_checkpointing: recompute each transformer block's activations in backward instead
            of keeping them (generator and critic; frozen networks run without gradient anyway).
        shard_size: ranks that shard one copy of the weights (the inner mesh dimension); the world
            size divided by it replicates (HSDP). 0: all ranks shard one copy (plain FSDP).
        checkpoint: ``file`` (one atomic safetensors file of full tensors, gathered on rank 0) or
            ``dcp`` (a ``torch.distributed.checkpoint`` folder written shard by shard by every rank).
    """

    mixed_precision: MixedPrecision = "fp32"
    activation_checkpointing: bool = False
    shard_size: int = 0
    checkpoint: CheckpointFormat = "file"

    def validate(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"parallel.mixed_precision must be one of {', '.join(MIXED_PRECISIONS)},"
                              f" got {self.mixed_precision!r}")
        if self.checkpoint not in CHECKPOINT_FORMATS:
            raise ConfigError(f"parallel.checkpoint must be one of {', '.join(CHECKPOINT_FORMATS)},"
                              f" got {self.checkpoint!r}")
        if self.shard_size < 0:
            raise ConfigError(f"parallel.shard_size must be >= 0 (0: all ranks), got {self.shard_size}")


@dataclass(frozen=True)
class Recipe:
    name: str
    preset: str = "tiny"
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def causal(self) -> bool:
        """Whether the trained model is the block-causal student (not the bidirectional teacher)."""
        return self.objective.kind in CAUSAL_OBJECTIVES

    def build_preset(self) -> Preset:
        return get_preset(self.preset, **self.preset_overrides)

    def validate(self) -> Recipe:
        for section in _SECTIONS:
            check_field_types(getattr(self, section), section)
        for name in ("name", "preset"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"recipe {name} must be a string, got {getattr(self, name)!r}")
        preset = self.build_preset()
        self.objective.validate()
        self.optim.validate()
        self.loop.validate()
        self.parallel.validate()
        self.data.validate(preset.cache.frames_per_block)
        if self.objective.kind == "ode" and not self.ode.pairs:
            raise ConfigError("objective.kind = 'ode' needs ode.pairs (a file from `mag train ode-pairs`)")
        if self.objective.kind == "dmd":
            self.dmd.validate(preset, self.data.clip_frames)
        elif self.data.source == "prompts":
            raise ConfigError(f"data.source = 'prompts' gives prompts only: objective.kind ="
                              f" {self.objective.kind!r} trains on clips; use 'world' or 'shards'")
        if self.objective.kind == "memory" and self.data.clip_frames > preset.dit.rope_max_positions:
            raise ConfigError(f"objective.kind = 'memory' trains on whole clips at random RoPE positions:"
                              f" data.clip_frames={self.data.clip_frames} must fit in"
                              f" dit.rope_max_positions={preset.dit.rope_max_positions}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Recipe sections that are typed dataclasses (every field has a default, whose type the value must have).
_SECTIONS = ("objective", "optim", "loop", "data", "init", "ode", "dmd")


def check_field_types(cfg: Any, section: str) -> None:
    """Refuse values of the wrong type in a recipe section: ``batch_size = true``, ``lr = "1e-3"``, a
    NaN or infinite float (TOML has ``nan`` and ``inf``). Ints are accepted where floats are expected."""
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        _check_value(f"{section}.{f.name}", getattr(cfg, f.name), getattr(defaults, f.name))


def _check_value(name: str, value: Any, default: Any) -> None:
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a finite number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
        ok, kind = isinstance(value, tuple) and len(value) == len(default), f"a list of {len(default)} values"
        if ok:
            for i, (item, item_default) in enumerate(zip(value, default, strict=True)):
                _check_value(f"{name}[{i}]", item, item_default)
    else:
        return
    if not ok:
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


# Fields that may change between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {("loop", "steps"), ("loop", "log_every"), ("loop", "ckpt_every"), ("loop", "keep_last"),
                     ("parallel", "shard_size"), ("parallel", "activation_checkpointing"),
                     ("parallel", "checkpoint"),
                     # the global batch stays; moving between 8 and 64 GPUs changes how it is split
                     ("loop", "grad_accum")}


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    if "name" not in data:
        raise ConfigError("a recipe needs a top-level 'name'")
    base = Recipe(name=data["name"])
    try:
        return replace_nested(base, {k: v for k, v in data.items() if k != "name"}).validate()
    except TypeError as err:
        raise ConfigError(f"invalid recipe {data['name']!r}: {err}") from err


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe. Missing file, bad TOML or bad values raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {path} is not valid TOML: {err}") from err
    return recipe_from_dict(data)


def recipe_differences(stored: dict[str, Any], current: Recipe) -> list[str]:
    """Fields whose values differ, except those in RESUMABLE_CHANGES; ``[]`` means resume is safe.

    Sections and fields a stored recipe lacks (written before they existed) count as their defaults,
    so older checkpoints resume under recipes that leave the new fields at their defaults.
    """
    now = current.to_dict()
    defaults = Recipe(name=current.name).to_dict()
    stored = {section: {**defaults[section], **value}
              if isinstance(value, dict) and isinstance(defaults.get(section), dict) else value
              for section, value in {**defaults, **stored}.items()}
    diffs: list[str] = []
    for section in sorted(set(stored) | set(now)):
        a, b = stored.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if (section, key) not in RESUMABLE_CHANGES and _norm(a.get(key)) != _norm(b.get(key)):
                    diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
        elif _norm(a) != _norm(b):
            diffs.append(f"{section}: checkpoint {a!r} vs now {b!r}")
    return diffs


def _norm(value: Any) -> Any:
    """JSON turns tuples into lists; compare them as equal."""
    if isinstance(value, tuple | list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value
