"""The MAG memory model (stage 1): what it may attend to, and how it compresses blocks while
streaming.

The memory model is a second DiT of the generator's architecture, always run with the empty prompt;
it squeezes each finished block of ``F`` latent frames into the K/V of the block's last frame.
Training (:func:`memory_training_mask`) and streaming (:class:`MemoryWriter`, writing under a
:class:`~mag.cache.MagPolicy`) see the same thing: a clean query sees its own block and the
compressed frames of earlier blocks, never the uncompressed sinks. docs/memory.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mag.cache import KVCache, MagPolicy
from mag.config import Preset, config_differences
from mag.errors import ConfigError, InputError
from mag.models.attention import CrossAttentionCache
from mag.models.dit import WanDiT
from mag.registry import load_model
from mag.schedulers import FlowMatchScheduler

# The stage recorded in model files (mag.registry.STAGES) for a memory model.
MEMORY_STAGE = "memory"
# What a memory model must share with the generator whose cache it writes: the network (its K/V go
# into the generator's attention), the latent geometry (tokens per frame), the block (one retained
# frame per block) and the text encoder (its empty prompt).
MEMORY_MODEL_MATCH: tuple[str, ...] = ("dit", "video", "cache.frames_per_block", "text_encoder")


def memory_model_mismatch(generator: Preset, memory: Preset,
                          fields: tuple[str, ...] = MEMORY_MODEL_MATCH) -> str | None:
    """The first of ``fields`` (dotted paths into the presets) where a memory model's preset differs
    from its generator's, as ``"field (key: generator's vs memory model's, ...)"``; None when they
    agree."""
    for path in fields:
        ours, theirs = generator, memory
        for part in path.split("."):
            ours, theirs = getattr(ours, part), getattr(theirs, part)
        if ours != theirs:
            return f"{path} ({config_differences(ours, theirs)}; generator vs memory model)"
    return None

__all__ = ["MEMORY_MODEL_MATCH", "MEMORY_STAGE", "MemoryWriter", "load_memory_model",
           "memory_model_mismatch", "memory_training_mask",
           "sample_memory_timesteps", "sample_start_position"]


def memory_training_mask(num_frames: int, frames_per_block: int,
                         device: torch.device | str = "cpu") -> Tensor:
    """Frame-level mask ``[2N, 2N]`` (True = may attend) over the sequence ``[clean ; noisy]``.

    Picture it as four quadrants, rows = queries, columns = keys, blocks of ``F`` frames, ``c_F-1``
    the retained (last) clean frame of a block:

    - clean -> clean: a clean query of block i sees every clean frame of block i (a full F x F
      square on the diagonal) and, in each earlier block, only the column of its retained frame;
    - clean -> noisy: empty (memory writes never see noisy inputs);
    - noisy -> clean: a noisy query of block i sees the retained-frame column of blocks 0..i, its
      own block's included, and nothing else: the whole block must come back from that one frame's
      K/V;
    - noisy -> noisy: a full F x F square on the diagonal (a block denoises bidirectionally).

    The clean rows are what :class:`MemoryWriter`'s write pass sees while streaming (its own block
    plus the compressed memory), i.e. :func:`mag.models.attention.last_frame_memory_mask` without
    sinks. ``docs/img/memory_mask.png`` draws it for 4 blocks.
    """
    if num_frames <= 0 or frames_per_block <= 0 or num_frames % frames_per_block:
        raise InputError("memory training needs a positive number of frames that is a multiple "
                         "of the block"
                         f" size {frames_per_block}, got {num_frames}")
    frames = torch.arange(num_frames, device=device)
    block = frames // frames_per_block
    retained = (frames % frames_per_block == frames_per_block - 1)[None, :]
    q, k = block[:, None], block[None, :]
    mask = torch.zeros(2 * num_frames, 2 * num_frames, dtype=torch.bool, device=device)
    mask[:num_frames, :num_frames] = (k == q) | ((k < q) & retained)
    mask[num_frames:, :num_frames] = (k <= q) & retained
    mask[num_frames:, num_frames:] = k == q
    return mask


def sample_memory_timesteps(scheduler: FlowMatchScheduler, batch_size: int, num_blocks: int,
                            generator: torch.Generator | None = None,
                            device: torch.device | str = "cpu") -> Tensor:
    """Noise level of each block's noisy half, drawn uniformly from the few-step list: ``[B,
    blocks]``.

    The memory model is trained at the timesteps the few-step generator visits, so its
    reconstruction is judged where the generator reads memory.
    """
    levels = scheduler.few_step_timesteps()
    index = torch.randint(len(levels), (batch_size, num_blocks), generator=generator)
    return levels[index].to(device)


def sample_start_position(num_frames: int, frames_per_block: int, max_positions: int,
                          generator: torch.Generator | None = None) -> int:
    """A random first RoPE position, a multiple of the block size, with the clip inside
    ``max_positions``.

    Drawn on the host (one draw per training step, not per block): the model sees many absolute
    positions, as it will far into a stream.
    """
    choices = (max_positions - num_frames) // frames_per_block + 1
    if choices <= 0:
        raise InputError(f"a clip of {num_frames} frames does not fit in"
                         f" dit.rope_max_positions={max_positions}")
    return int(torch.randint(choices, (1,), generator=generator)[0]) * frames_per_block


class MemoryWriter:
    """Streaming :class:`~mag.pipelines.writers.CacheWriter` that compresses blocks with the memory
    model.

    After the generator has denoised a block, the frozen memory model runs the clean block at t=0
    with the empty prompt and ``cache_write=True`` on the generator's cache. The cache's
    :class:`~mag.cache.MagPolicy` keeps only the block's last frame (plus uncompressed sinks), at
    its own RoPE position; the generator later reads those K/V. The write pass attends
    bidirectionally within the block and to the compressed memory already in the cache; sink frames
    that are not a block's last frame are masked out, so the pass equals the clean rows of
    :func:`memory_training_mask`.

    Args:
        memory_model: the trained memory model (same ``num_layers``, heads and head size as the
        generator). empty_context: ``[1 or B, L, text_dim]`` embeddings of the empty prompt
        (projected once here by the
            memory model's own text layers), or an already projected :class:`CrossAttentionCache`.
    """

    def __init__(self, memory_model: WanDiT, empty_context: Tensor | CrossAttentionCache) -> None:
        self.model = memory_model
        with torch.no_grad():
            self.empty = (empty_context if isinstance(empty_context, CrossAttentionCache)
                          else memory_model.encode_context(
                              empty_context.to(memory_model.patch_embedding.weight.device)))

    def write(self, cache: KVCache, clean_block: Tensor, frame_positions: Tensor,
              context: CrossAttentionCache | None = None, *,
              width_offsets: Tensor | None = None) -> None:
        """Write the compressed K/V of ``clean_block: [B, F, C, H, W]`` at ``frame_positions: [F]``.

        ``context`` (the generator's prompt) is ignored: the memory model always reads the empty
        prompt. ``width_offsets: [B, F]`` camera positions for camera-anchored models.
        """
        policy = cache.policy
        if not isinstance(policy, MagPolicy):
            raise ConfigError("the memory model writes compressed memory, so its cache needs a "
                              "MagPolicy"
                              f" ('mag' or 'bounded'), got policy {policy.name!r}")
        cfg = self.model.cfg
        geometry = (cfg.num_layers, cfg.num_heads, cfg.head_dim)
        if geometry != (cache.num_layers, cache.num_heads, cache.head_dim):
            raise ConfigError(f"memory model has (layers, heads, head_dim) {geometry} but the "
                              "generator's"
                              f" cache has {(cache.num_layers, cache.num_heads, cache.head_dim)}; "
                              "a memory"
                              " model must share the generator's architecture")
        batch, frames = clean_block.shape[:2]
        view = policy.memory_view(cache, frames)
        # Hidden frames that lead the read order are skipped, not masked (unmasked attention is the
        # fast path); a mask is needed only if a hidden frame comes after a visible one.
        prefix = 0 if view is None else next((i for i, seen in enumerate(view) if seen), len(view))
        frame_mask = None
        if view is not None and not all(view[prefix:]):
            device = clean_block.device
            readable = view[prefix:]
            cached = torch.tensor(readable).to(device, non_blocking=True).expand(frames,
                                                                                 len(readable))
            frame_mask = torch.cat([cached, torch.ones(frames, frames, dtype=torch.bool,
                                                       device=device)], 1)
        zero = torch.zeros(batch, device=clean_block.device)
        with torch.no_grad(), cache.hiding_prefix(prefix):
            self.model(clean_block, zero, self._context(batch), frame_positions=frame_positions,
                       frame_mask=frame_mask, kv_cache=cache, cache_write=True,
                       width_offsets=width_offsets)

    def _context(self, batch: int) -> CrossAttentionCache:
        """The empty prompt's cross-attention K/V for ``batch`` samples (a broadcast view of
        one)."""
        if self.empty.batch_size == batch:
            return self.empty
        if self.empty.batch_size != 1:
            raise InputError("the memory model's empty context has batch "
                             f"{self.empty.batch_size}, the stream"
                             f" has {batch}; give one empty prompt ([1, L, text_dim]) to serve "
                             "any batch")
        k, v = self.empty.k, self.empty.v
        return CrossAttentionCache(k.expand(k.shape[0], batch, *k.shape[2:]),
                                   v.expand(v.shape[0], batch, *v.shape[2:]))


def load_memory_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[WanDiT, Preset,
                                                                                     dict[str,
                                                                                          Any]]:
    """Load a memory model (a registry name, a model file or a training checkpoint whose stage is
    ``memory``).

    A generator file (stage ``teacher``, ``causal``, ``dmd``, ``mag-generator``) is refused: both
    have the same architecture, so loading the wrong one would run silently and compress nothing
    useful.

    Raises:
        CheckpointError: wrong stage, no stage information, or the errors of
        :func:`mag.registry.load_model`.
    """

    return load_model(path, device=device, expect_stage=(MEMORY_STAGE,))


def check_memory_model(preset: Preset, memory_preset: Preset) -> None:
    """Refuse a memory model whose architecture, latent geometry, block size or text encoder differs
    from the generator's (:func:`mag.memory.memory_model_mismatch`)."""
    mismatch = memory_model_mismatch(preset, memory_preset)
    if mismatch is not None:
        raise ConfigError(
            f"the memory model (preset {memory_preset.name!r}) does not match the generator (preset"
            f" {preset.name!r}) in {mismatch}; a memory model writes into the generator's KV "
            "cache and"
            " must be trained on the generator's preset: pass the memory model of this generator")
