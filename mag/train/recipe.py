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
from mag.errors import ConfigError
from mag.train.recipe_sections import (
    CHECKPOINT_FORMATS,
    MIXED_PRECISIONS,
    ROLLOUT_POLICIES,
    SELF_FORCING_DMD_BETAS,
    CheckpointFormat,
    DMDConfig,
    HorizonConfig,
    MixedPrecision,
    ParallelConfig,
    RolloutPolicy,
)

# The whole recipe, the sections of mag.train.recipe_sections included.
__all__ = ["CAUSAL_OBJECTIVES", "CHECKPOINT_FORMATS", "CheckpointFormat", "DATA_SOURCES",
           "DMDConfig", "DataConfig", "HorizonConfig", "InitConfig", "LoopConfig",
           "MIXED_PRECISIONS",
           "MixedPrecision", "OBJECTIVES", "ODEConfig", "ObjectiveConfig", "ObjectiveKind",
           "OptimConfig", "ParallelConfig", "RESUMABLE_CHANGES", "ROLLOUT_POLICIES", "Recipe",
           "RolloutPolicy", "SELF_FORCING_DMD_BETAS", "check_field_types", "load_recipe",
           "recipe_differences", "recipe_from_dict"]


DATA_SOURCES: tuple[str, ...] = ("world", "prompts", "shards")

ObjectiveKind = Literal["teacher_fm", "causal_fm", "ode", "dmd", "memory", "horizon"]
OBJECTIVES: tuple[str, ...] = ("teacher_fm", "causal_fm", "ode", "dmd", "memory", "horizon")
# Objectives whose student is the block-causal generator (``teacher_fm`` trains the bidirectional
# teacher, ``memory`` the stage-1 memory model).
CAUSAL_OBJECTIVES: tuple[str, ...] = ("causal_fm", "ode", "dmd", "horizon")


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
            raise ConfigError("optim.lr and optim.grad_clip must be > 0 and optim.warmup_steps >= "
                              "0")
        if (
            not (0 <= self.ema_decay < 1)
            or len(self.betas) != 2
            or not all(0 <= b < 1 for b in self.betas)
        ):
            raise ConfigError("optim.ema_decay must be in [0, 1) and optim.betas two values in "
                              "[0, 1)")


@dataclass(frozen=True)
class LoopConfig:
    """Step counts and cadence. ``batch_size`` is per optimiser step, split into ``grad_accum``
    parts."""

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
                f"loop.batch_size={self.batch_size} must be divisible by "
                f"loop.grad_accum={self.grad_accum}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Panorama-world clips. ``world`` holds ``WorldConfig`` overrides (see ``mag.world``).

    Attributes:
        clip_frames: latent frames per training clip (a multiple of the block size). world:
        overrides of the world config (speeds, excursions, frame size, ...). text_mode: ``tokens``
        (per-token MiniLM states) or ``pooled`` (one sentence vector). source: ``world`` (procedural
        clips), ``prompts`` (``data.prompts``, one prompt per line; the
            data-free DMD stages only, :class:`mag.data.PromptFileSource`) or ``shards`` (VAE
            latents of real videos from ``mag data encode``,
            :class:`mag.data.shards.LatentShardSource`).
        prompts: the prompt file of ``source = "prompts"``. shards: the shard folder of ``source =
        "shards"``. text_encoder_path: weights of a ``umt5`` text encoder (a diffusers Wan pipeline
        folder or a
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
            raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got "
                              f"{self.source!r}")
        if self.source == "prompts" and not self.prompts:
            raise ConfigError("data.source = 'prompts' needs data.prompts (a text file, one "
                              "prompt per line)")
        if self.source == "shards" and not self.shards:
            raise ConfigError("data.source = 'shards' needs data.shards (a folder from `mag data "
                              "encode`)")
        if self.clip_frames <= 0 or self.clip_frames % frames_per_block:
            raise ConfigError(
                f"data.clip_frames={self.clip_frames} must be a positive multiple of the block size"
                f" {frames_per_block}"
            )
        if self.text_mode not in ("tokens", "pooled"):
            raise ConfigError("data.text_mode must be 'tokens' or 'pooled', got "
                              f"{self.text_mode!r}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss, and its knobs.

    Attributes:
        kind: ``teacher_fm`` (bidirectional flow matching), ``causal_fm`` (teacher-forced
            block-causal flow matching on ``[clean ; noisy]`` sequences, CausVid-style init),
            ``ode`` (the causal student regresses the teacher's ODE endpoint from its trajectory,
            Self-Forcing's init; needs ``ode.pairs``), ``dmd`` (Self-Forcing DMD with a critic;
            needs ``dmd.teacher``), ``horizon`` (flow matching on long leave-and-return clips
            that read the two-tier memory, ``[horizon]``) or ``memory`` (the stage-1 memory model:
            reconstruct whole blocks from their compressed last frames, always with the empty
            prompt; ``init.model`` should be the generator).
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
            raise ConfigError(f"objective.kind must be one of {', '.join(OBJECTIVES)}, got "
                              f"{self.kind!r}")
        if not 0 <= self.cfg_dropout <= 1:
            raise ConfigError(f"objective.cfg_dropout must be in [0, 1], got {self.cfg_dropout}")


@dataclass(frozen=True)
class InitConfig:
    """Where the trained model's initial weights come from.

    Attributes:
        model: a model file, training checkpoint (its EMA weights) or registry name, or official
            weights (a Wan2.1 or diffusers folder, a Self-Forcing / MAG checkpoint), loaded with
            :func:`mag.train.networks.load_network`; its ``dit`` config must equal the recipe's.
            Empty: random initialisation from ``loop.seed``. Read once at the start of a run, not on
            resume. A ``memory`` run should start from the generator whose blocks it will compress
            (docs/design.md §1); without one it trains from scratch and warns.
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
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
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
            raise ConfigError("objective.kind = 'ode' needs ode.pairs (a file from `mag train "
                              "ode-pairs`)")
        if self.objective.kind == "dmd":
            self.dmd.validate(preset, self.data.clip_frames)
        elif self.data.source == "prompts":
            raise ConfigError(f"data.source = 'prompts' gives prompts only: objective.kind ="
                              f" {self.objective.kind!r} trains on clips; use 'world' or 'shards'")
        if self.objective.kind == "horizon":
            self.horizon.validate(preset, self.data.clip_frames)
        if (
            self.objective.kind == "memory"
            and self.data.clip_frames > preset.dit.rope_max_positions
        ):
            raise ConfigError("objective.kind = 'memory' trains on whole clips at random RoPE "
                              "positions:"
                              f" data.clip_frames={self.data.clip_frames} must fit in"
                              f" dit.rope_max_positions={preset.dit.rope_max_positions}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Recipe sections that are typed dataclasses (every field has a default, whose type the value must
# have).
_SECTIONS = ("objective", "optim", "loop", "data", "init", "ode", "dmd", "horizon")


def check_field_types(cfg: Any, section: str) -> None:
    """Refuse values of the wrong type in a recipe section: ``batch_size = true``, ``lr = "1e-3"``,
    a NaN or infinite float (TOML has ``nan`` and ``inf``). Ints are accepted where floats are
    expected."""
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
        ok, kind = (
            isinstance(value, tuple) and len(value) == len(default),
            f"a list of {len(default)} values",
        )
        if ok:
            for i, (item, item_default) in enumerate(zip(value, default, strict=True)):
                _check_value(f"{name}[{i}]", item, item_default)
    else:
        return
    if not ok:
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


# Fields that may change between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {("loop", "steps"), ("loop", "log_every"), ("loop", "ckpt_every"), ("loop",
                                                                                        "keep_last"),
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
        raise ConfigError(
            f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from err
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
                if (section,
                    key) not in RESUMABLE_CHANGES and _norm(a.get(key)) != _norm(b.get(key)):
                    diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now "
                                 f"{b.get(key)!r}")
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
