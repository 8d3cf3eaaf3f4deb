"""What the benchmarks and the user commands share: reading a model file's training record, the text
encoder it was trained with, the memory model with its empty prompt, and the run metadata every result
file carries."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import torch

from mag.config import Preset
from mag.text import PromptEmbeddingCache

__all__ = ["DEFAULT_TEXT_MODE", "add_memory_cache_arguments", "empty_context", "load_memory_for",
           "machine_info", "model_record", "recipe_data", "synchronize", "text_cache"]

# Text-encoder mode when a model file does not say (the tiny recipes use pooled MiniLM).
DEFAULT_TEXT_MODE = "pooled"


def add_memory_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``--memory-slots`` and ``--memory-sink-frames``: the compressed policies' cache geometry, which a
    benchmark may change without retraining (``args.memory_slots``, ``args.memory_sink_frames``; None: the
    preset's)."""
    parser.add_argument("--memory-slots", type=int, default=None,
                        help="compressed frames the bounded policy's ring keeps (default: the preset's"
                             " cache.memory_slots)")
    parser.add_argument("--memory-sink-frames", type=int, default=None,
                        help="first frames the downsample / mag / bounded policies keep uncompressed"
                             " (default: the preset's cache.memory_sink_frames)")


def recipe_data(meta: dict[str, Any]) -> dict[str, Any]:
    """``recipe.data`` of a model's metadata (clip length, text mode, training world), or ``{}``."""
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    data = recipe.get("data", {})
    return data if isinstance(data, dict) else {}


def model_record(path: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """What a result file says about a model: its source, stage, recipe, training steps and commit."""
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    return {"path": path, "name": meta.get("name"), "stage": meta.get("stage"), "recipe": recipe.get("name"),
            "train_steps": meta.get("train_steps"), "commit": meta.get("commit"), "note": meta.get("note")}


def text_cache(preset: Preset, meta: dict[str, Any]) -> PromptEmbeddingCache:
    """The prompt cache of the text encoder and mode the model was trained with."""
    from mag.train.steps import prompt_cache

    return prompt_cache(preset.text_encoder, recipe_data(meta).get("text_mode", DEFAULT_TEXT_MODE))


def empty_context(preset: Preset, meta: dict[str, Any]) -> torch.Tensor:
    """``[1, L, text_dim]`` embeddings of the empty prompt, which the memory model always reads."""
    return text_cache(preset, meta).get([""])


def load_memory_for(path: str, preset: Preset, device: str) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """``(memory model, its metadata, empty-prompt embeddings)`` for a generator of ``preset``; a
    generator file or a memory model of another preset is a clear error."""
    from mag.bench.consistency import check_memory_model
    from mag.memory import load_memory_model

    memory, memory_preset, meta = load_memory_model(path, device=device)
    check_memory_model(preset, memory_preset)
    return memory, meta, empty_context(memory_preset, meta)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work before reading a wall clock (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: str) -> dict[str, Any]:
    """Where a result was measured: host, platform, CPU model, Python / torch, threads, GPU (cuda)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"node": platform.node(), "platform": platform.platform(),
                            "processor": platform.processor(), "cpu": cpu, "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "device": device, "threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
