"""Training recipes: typed dataclasses read from TOML files in ``recipes/``.

A recipe fixes everything a run depends on (preset and overrides, objective, optimiser, data), so a
checkpoint's stored recipe is enough to reproduce it. Resuming checks the stored recipe against the
current one: only ``loop.steps`` (train longer) and logging/checkpoint cadence may differ.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mag.config import Preset, get_preset, replace_nested
from mag.errors import ConfigError

ObjectiveKind = Literal["teacher_fm", "causal_fm"]
OBJECTIVES: tuple[str, ...] = ("teacher_fm", "causal_fm")


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
    """

    clip_frames: int = 24
    world: dict[str, Any] = field(default_factory=dict)
    text_mode: Literal["tokens", "pooled"] = "pooled"

    def validate(self, frames_per_block: int) -> None:
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
        kind: ``teacher_fm`` (bidirectional flow matching) or ``causal_fm`` (teacher-forced
            block-causal flow matching on ``[clean ; noisy]`` sequences, CausVid-style init).
        cfg_dropout: probability of replacing the prompt with the empty prompt (enables CFG and
            teaches the model to draw from history alone).
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
class Recipe:
    name: str
    preset: str = "tiny"
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def build_preset(self) -> Preset:
        return get_preset(self.preset, **self.preset_overrides)

    def validate(self) -> Recipe:
        preset = self.build_preset()
        self.objective.validate()
        self.optim.validate()
        self.loop.validate()
        self.data.validate(preset.cache.frames_per_block)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that may change between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {("loop", "steps"), ("loop", "log_every"), ("loop", "ckpt_every"), ("loop", "keep_last")}


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
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {path} is not valid TOML: {err}") from err
    return recipe_from_dict(data)


def recipe_differences(stored: dict[str, Any], current: Recipe) -> list[str]:
    """Fields whose values differ, except those in RESUMABLE_CHANGES; ``[]`` means resume is safe."""
    now = current.to_dict()
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
