"""The application layer: what demo, generate, serve and the benchmarks load and share.

Generators and memory models (with the text encoder they were trained with and the empty prompt the
memory model reads), the default models and sampler (:class:`DemoConfig`), the shared command-line
flags, devices and threads, and the run metadata every result file carries. Imports only lower
layers (docs/design.md, "Layer order").
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mag.config import Preset
from mag.errors import InputError
from mag.io.cli import add_dtype_argument, add_runtime_arguments, set_threads
from mag.memory import check_memory_model, load_memory_model
from mag.models import WanDiT
from mag.pipelines import SamplerConfig, SamplerKind, load_generator
from mag.text import PromptEmbeddingCache, prompt_cache
from mag.text.umt5 import UMT5_MODE

__all__ = ["DEFAULTS", "DEFAULT_TEXT_MODE", "DemoConfig", "LoadedModels", "add_compile_argument",
           "add_memory_cache_arguments", "cache_overrides", "add_model_arguments", "check_velocity",
           "config_from_args",
           "empty_context", "load_memory_for", "load_models", "machine_info", "model_record",
           "recipe_data", "sampler_config", "set_threads", "synchronize", "text_cache"]

# Text-encoder mode when a model file does not say (the tiny recipes use pooled MiniLM).
DEFAULT_TEXT_MODE = "pooled"


# The compressed policies' cache geometry a benchmark may change without retraining: CacheConfig
# field -> what the flag sets (the flag is --field-with-dashes).
CACHE_FLAGS: dict[str, str] = {
    "memory_slots": "compressed frames the bounded policy's ring keeps",
    "memory_sink_frames": "first frames the downsample / mag / bounded / archive policies keep "
                          "uncompressed",
    "archive_ring_slots": "newest compressed frames the archive policy keeps on the GPU",
    "archive_retrieval_slots": "archived frames the archive policy retrieves per block",
}


def add_memory_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :data:`CACHE_FLAGS` field (default None: the preset's value);
    :func:`cache_overrides` collects them."""
    for field, meaning in CACHE_FLAGS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                            help=f"{meaning} (default: the preset's cache.{field})")


def cache_overrides(args: argparse.Namespace) -> dict[str, int]:
    """The ``CacheConfig`` fields the :func:`add_memory_cache_arguments` flags set."""
    return {field: getattr(args, field) for field in CACHE_FLAGS
            if getattr(args, field) is not None}


def recipe_data(meta: dict[str, Any]) -> dict[str, Any]:
    """``recipe.data`` of a model's metadata (clip length, text mode, training world), or ``{}``."""
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    data = recipe.get("data", {})
    return data if isinstance(data, dict) else {}


def model_record(path: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """What a result file says about a model: its source, stage, recipe, training steps and
    commit."""
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    return {"path": path, "name": meta.get("name"), "stage": meta.get("stage"),
            "recipe": recipe.get("name"),
            "train_steps": meta.get("train_steps"), "commit": meta.get("commit"),
            "note": meta.get("note")}


def text_cache(preset: Preset, meta: dict[str, Any]) -> PromptEmbeddingCache:
    """The prompt cache of the text encoder and mode the model was trained with (umT5 has one
    mode)."""
    default = UMT5_MODE if preset.text_encoder == "umt5" else DEFAULT_TEXT_MODE
    return prompt_cache(preset.text_encoder, recipe_data(meta).get("text_mode", default))


def empty_context(preset: Preset, meta: dict[str, Any]) -> torch.Tensor:
    """``[1, L, text_dim]`` embeddings of the empty prompt, which the memory model always reads."""
    return text_cache(preset, meta).get([""])


def load_memory_for(path: str, preset: Preset, device: str,
                    dtype: torch.dtype = torch.float32) -> tuple[WanDiT, dict[str, Any], Tensor]:
    """``(memory model, its metadata, empty-prompt embeddings)`` for a generator of ``preset``, in
    ``dtype``; a generator file or a memory model of another preset is a clear error."""
    memory, memory_preset, meta = load_memory_model(path, device=device)
    check_memory_model(preset, memory_preset)
    return memory.to(dtype), meta, empty_context(memory_preset, meta).to(device, dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work before reading a wall clock (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: str) -> dict[str, Any]:
    """Where a result was measured: host, platform, CPU model, Python / torch, threads, GPU
    (cuda)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"node": platform.node(), "platform": platform.platform(),
                            "processor": platform.processor(), "cpu": cpu,
                            "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "device": device, "threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


@dataclass(frozen=True)
class DemoConfig:
    """Which shipped models and sampler the user-facing commands run by default.

    Until the stage-2 generator ``tiny-mag`` ships, the generator is the camera-anchored long-recall
    causal model sampled with 8 Euler steps; switching is one line here
    (``DemoConfig(model="tiny-mag", sampler="few_step", steps=0)``).

    Attributes:
        model: generator (shipped name, model file or training checkpoint). memory_model: stage-1
        memory model that writes the cache under the ``mag`` / ``bounded`` policies. sampler:
        ``euler`` (causal flow-matching models) or ``few_step`` (distilled models). steps: Euler
        steps (``euler`` only).
    """

    model: str = "tiny-causal-long"
    memory_model: str = "tiny-memory"
    sampler: SamplerKind = "euler"
    steps: int = 8


DEFAULTS = DemoConfig()


# ---------------------------------------------------------------------------------------------
# Loading a generator and its memory model


@dataclass
class LoadedModels:
    """A generator, optionally its memory model, and the text encoder they were trained with.

    ``encode(prompts)`` returns ``[B, L, text_dim]`` prompt embeddings; ``empty_context`` is the
    empty prompt's ``[1, L, text_dim]`` embeddings that the memory model reads (None without one).
    """

    model: WanDiT
    preset: Preset
    meta: dict[str, Any]
    text: PromptEmbeddingCache
    memory: WanDiT | None = None
    memory_meta: dict[str, Any] | None = None
    empty_context: Tensor | None = None

    def encode(self, prompts: list[str]) -> Tensor:
        weight = self.model.patch_embedding.weight
        return self.text.get(prompts).to(weight.device, weight.dtype)

    def records(self, config: DemoConfig) -> dict[str, Any]:
        """What a result file says about the models (source, stage, recipe, steps, commit)."""
        out = {"generator": model_record(config.model, self.meta)}
        if self.memory_meta is not None:
            out["memory_model"] = model_record(config.memory_model, self.memory_meta)
        return out

    def clip_frames(self) -> int | None:
        """The generator's training clip length (``recipe.data.clip_frames``), or None."""
        frames = recipe_data(self.meta).get("clip_frames")
        return frames if isinstance(frames, int) and frames > 0 else None

    def training_world(self) -> dict[str, Any] | None:
        """The generator's training world overrides (``recipe.data.world``), or None."""
        world = recipe_data(self.meta).get("world")
        return world if isinstance(world, dict) and world else None


def load_models(config: DemoConfig, *, device: str = "cpu", with_memory: bool = True,
                dtype: torch.dtype = torch.float32) -> LoadedModels:
    """Load ``config.model`` (and ``config.memory_model`` when ``with_memory``) in ``dtype``, and
    their text encoder.

    Raises:
        CheckpointError: a missing or wrong-stage file; ConfigError: a memory model of another
        preset.
    """
    model, preset, meta = load_generator(config.model, device=device)
    loaded = LoadedModels(model.to(dtype), preset, meta, text_cache(preset, meta))
    if with_memory:
        loaded.memory, loaded.memory_meta, loaded.empty_context = load_memory_for(
            config.memory_model, preset, device, dtype
        )
    return loaded


def sampler_config(config: DemoConfig) -> SamplerConfig:
    """The :class:`~mag.pipelines.SamplerConfig` of ``config`` (validated)."""
    return SamplerConfig(config.sampler, config.steps).validate()


def add_model_flags(parser: argparse.ArgumentParser, *, model: str | None, memory_model: str | None,
                    model_when_none: str = "", memory_when_none: str = "", with_model: bool = True,
                    memory_required: bool = False) -> None:
    """``--model`` (the generator), ``--memory-model`` and ``--dtype``, declared once for every
    command.

    ``model`` / ``memory_model`` are the defaults; ``*_when_none`` says what a None default means;
    read ``--dtype`` with :func:`mag.io.cli.dtype_from_args`.
    """
    add_dtype_argument(parser)
    if with_model:
        shown = model if model is not None else model_when_none
        parser.add_argument("--model", default=model,
                            help="generator: shipped name, model file or training checkpoint "
                                 "(default"
                                 f" {shown})")
    shown = memory_model if memory_model is not None else memory_when_none
    parser.add_argument("--memory-model", default=memory_model, required=memory_required,
                        help="stage-1 memory model (shipped name, model file or training "
                             "checkpoint) that writes the cache under the mag, bounded, official "
                             "and archive policies; same preset as the generator"
                             + (f" (default {shown})" if shown else ""))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model/--memory-model/--dtype/--sampler/--steps/--device/--threads`` with
    :data:`DEFAULTS`."""
    add_model_flags(parser, model=DEFAULTS.model, memory_model=DEFAULTS.memory_model)
    parser.add_argument("--sampler", choices=("few_step", "euler"), default=DEFAULTS.sampler,
                        help=f"block sampler (default {DEFAULTS.sampler}; few_step for distilled "
                             "models)")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps,
                        help=f"Euler steps (--sampler euler; default {DEFAULTS.steps})")
    add_runtime_arguments(parser)


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """``--compile`` of the streaming commands (:func:`mag.pipelines.compile_stream`)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block except its cached attention before "
                             "streaming (one"
                             " untimed warm-up block compiles it; pays off on long streams and "
                             "GPUs)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return replace(DEFAULTS, model=args.model, memory_model=args.memory_model, sampler=args.sampler,
                   steps=args.steps)


def check_velocity(value: Any, where: str, max_px: float) -> float:
    """``value`` as a camera velocity (px/frame) if it is a finite number within the frame width."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{where}: a velocity must be a finite number of px/frame, got "
                         f"{value!r:.40}")
    if abs(value) > max_px:
        raise InputError(f"{where}: velocity {value} px/frame exceeds the frame width {max_px:g} px"
                         " (consecutive frames would share nothing); use a smaller speed")
    return float(value)
