"""Who writes a stream's KV cache, and the cache policies by name.

After a block is denoised, one clean pass at ``t = 0`` writes its K/V: by default the generator
itself (:class:`GeneratorWriter`); under ``mag`` / ``bounded`` the MAG memory model
(:class:`mag.memory.MemoryWriter`), which :func:`writer_for` builds and the streaming generator is
handed.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mag.cache import (
    ArchivePolicy,
    CachePolicy,
    DownsamplePolicy,
    FullPolicy,
    KVCache,
    MagPolicy,
    WindowPolicy,
)
from mag.config import Preset
from mag.errors import ConfigError
from mag.memory import MemoryWriter
from mag.models.attention import CrossAttentionCache
from mag.models.dit import WanDiT

# Policies whose cache is written by the trained memory model (mag.memory), which must be passed in.
MEMORY_MODEL_POLICIES: tuple[str, ...] = ("mag", "bounded", "official", "archive")
# Policies that need nothing but the generator.
GENERATOR_ONLY_POLICIES: tuple[str, ...] = ("full", "window", "downsample")
AVAILABLE_POLICIES: tuple[str, ...] = GENERATOR_ONLY_POLICIES + MEMORY_MODEL_POLICIES


def check_policy_name(name: str, *, has_memory_model: bool = True) -> str:
    """``name`` if it is a cache policy (and, for ``mag`` / ``bounded``, a memory model is at hand),
    else a one-line ConfigError listing what is available: CLIs call this before loading any
    model."""
    if name not in AVAILABLE_POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; available policies:"
                          f" {', '.join(AVAILABLE_POLICIES)}")
    if name in MEMORY_MODEL_POLICIES and not has_memory_model:
        raise ConfigError(f"policy {name!r} needs a trained MAG memory model: pass --memory-model "
                          "NAME|PATH"
                          f" (a stage 'memory' model, e.g. tiny-memory), or use one of"
                          f" {', '.join(GENERATOR_ONLY_POLICIES)}")
    return name


def policy_from_name(name: str, preset: Preset) -> CachePolicy:
    """The cache policy called ``name``, sized by ``preset.cache``.

    ``window`` keeps ``sink_frames`` + ``window_frames`` frames; ``downsample`` keeps
    ``memory_sink_frames`` uncompressed first frames plus the last frame of every block (unbounded);
    ``mag`` keeps the same frames, written by the memory model (:func:`writer_for`); ``bounded`` is
    ``mag`` with a ring of ``cache.memory_slots`` compressed frames, so KV size and per-block cost
    stop growing; ``official`` is ``bounded`` with the memory model reading the sinks too, as the
    released MAG does; ``archive`` is a ring of ``cache.archive_ring_slots`` compressed frames plus
    ``cache.archive_retrieval_slots`` filled from the frames it evicted (:mod:`mag.cache.archive`).
    """
    cache = preset.cache
    check_policy_name(name)
    if name == "archive":
        return ArchivePolicy(cache.memory_sink_frames, cache.archive_ring_slots,
                             cache.archive_retrieval_slots, host_mib=cache.archive_host_mib)
    if name == "full":
        return FullPolicy()
    if name == "window":
        return WindowPolicy(cache.sink_frames, cache.window_frames)
    if name == "downsample":
        return DownsamplePolicy(cache.memory_sink_frames)
    if name == "official":
        return MagPolicy(cache.memory_sink_frames, cache.memory_slots, memory_sees_sinks=True)
    return MagPolicy(cache.memory_sink_frames, cache.memory_slots if name == "bounded" else None)


def writer_for(policy: CachePolicy, *, memory_model: WanDiT | None = None,
               empty_context: Tensor | CrossAttentionCache | None = None) -> CacheWriter | None:
    """The writer a stream under ``policy`` is handed: the memory model's (run with
    ``empty_context``, the empty prompt's ``[1, L, text_dim]`` embeddings) under ``mag`` /
    ``bounded``, None (the generator) else."""
    if not isinstance(policy, MagPolicy):
        return None
    if memory_model is None or empty_context is None:
        missing = "memory_model" if memory_model is None else "empty_context"
        raise ConfigError(
            f"policy {policy.name!r} needs the trained MAG memory model and the empty prompt "
            f"({missing} not"
            f" given): writer_for(policy, memory_model=load_memory_model(path)[0],"
            " empty_context=<empty prompt embeddings [1, L, text_dim]>) "
            "(mag.memory.load_memory_model);"
            f" without one, available policies: {', '.join(GENERATOR_ONLY_POLICIES)}"
        )
    return MemoryWriter(memory_model, empty_context)


# ---------------------------------------------------------------------------------------------
# Who writes the cache


class CacheWriter(Protocol):
    """Runs the clean write pass of one finished block on ``cache`` (phase 2 in the module
    docstring).

    Args of :meth:`write`:
        cache: the stream's cache; the pass must use ``cache_write=True`` on it exactly once.
        clean_block: ``[B, F, C, H, W]`` clean latents of the block.
        frame_positions: ``[F]`` long absolute RoPE positions of the block.
        context: the generator's prompt cross-attention cache (a memory model ignores it and uses
            its own empty-text context).
        width_offsets: ``[B, F]`` camera positions (patches) for camera-anchored models, else None.
    """

    def write(self, cache: KVCache, clean_block: Tensor, frame_positions: Tensor,
              context: CrossAttentionCache, *, width_offsets: Tensor | None = None) -> None:
        ...


class GeneratorWriter:
    """Default writer: the generator itself runs the clean block at t=0 with the prompt
    (Self-Forcing)."""

    def __init__(self, model: WanDiT) -> None:
        self.model = model

    def write(self, cache: KVCache, clean_block: Tensor, frame_positions: Tensor,
              context: CrossAttentionCache, *, width_offsets: Tensor | None = None) -> None:
        zero = torch.zeros(clean_block.shape[0], device=clean_block.device)
        self.model(clean_block, zero, context, frame_positions=frame_positions, kv_cache=cache,
                   cache_write=True, width_offsets=width_offsets)


def default_writer(policy: CachePolicy, model: WanDiT) -> CacheWriter:
    """The generator's own writer; a memory policy is refused (it would silently downsample)."""
    if isinstance(policy, MagPolicy):
        raise ConfigError(f"policy {policy.name!r} has no memory-model writer; pass"
                          " writer=writer_for(policy, memory_model=..., empty_context=...)"
                          " (or MemoryWriter(memory_model, empty_context))")
    return GeneratorWriter(model)
