"""Self-Forcing training rollout: the student generates a whole clip autoregressively, as at
inference.

It follows the streaming protocol of :mod:`mag.pipelines.streaming` block by block, with gradient
through ONE denoising step per block: earlier steps run without gradient, the exit step (shared by
all blocks of a rollout, 1-based in ``1..K``) gives the block's output, and the clean write pass
stores detached K/V (by the generator, or the frozen memory model under ``mag`` / ``bounded``).
Random draws come in as arguments, in the order :class:`StreamingGenerator` consumes them, so a
rollout is a pure function of its inputs. Step by step: docs/training.md, "Training chain".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mag.cache import CachePolicy, KVCache
from mag.errors import InputError
from mag.models.attention import CrossAttentionCache
from mag.models.dit import WanDiT
from mag.pipelines.writers import CacheWriter, default_writer
from mag.schedulers import FlowMatchScheduler

__all__ = ["BlockContexts", "ContextSource", "draw_exit_step", "draw_rollout_noise",
           "self_forcing_rollout"]

# A prompt as text-encoder output ``[B, L, text_dim]`` or as already projected cross-attention K/V.
ContextSource = Tensor | CrossAttentionCache
# Per-block prompts: a sequence indexed by block, or a function of the block index.
BlockContexts = Sequence[ContextSource] | Callable[[int], ContextSource]

# Index of the initial-noise draw in ``noise_draws``.
_INITIAL_DRAW = 0


def draw_exit_step(num_steps: int, generator: torch.Generator | None = None) -> int:
    """The 1-based exit step, uniform in ``1..num_steps`` (one host int per rollout, not per
    block)."""
    if num_steps < 1:
        raise InputError(f"num_steps must be >= 1, got {num_steps}")
    return int(torch.randint(1, num_steps + 1, (), generator=generator))


def draw_rollout_noise(batch_size: int, num_blocks: int, frames_per_block: int,
                       frame_shape: tuple[int, int, int], num_steps: int,
                       generator: torch.Generator | None = None, *,
                       dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> Tensor:
    """All noise a rollout may use: ``[num_steps, B, num_blocks * frames_per_block, C, H, W]``.

    Drawn block by block, initial noise first and then one draw per re-noising, which is the order
    :meth:`~mag.pipelines.streaming.StreamingGenerator.generate_block` consumes a generator in; so a
    rollout with ``exit_step = num_steps`` reproduces that stream for the same seed.
    """
    if batch_size < 1 or num_blocks < 1 or frames_per_block < 1 or num_steps < 1:
        raise InputError(f"draw_rollout_noise needs positive sizes, got batch {batch_size}, blocks"
                         f" {num_blocks}, frames_per_block {frames_per_block}, steps {num_steps}")
    block_shape = (batch_size, frames_per_block, *frame_shape)
    draws = torch.empty(num_steps, batch_size, num_blocks * frames_per_block, *frame_shape,
                        dtype=dtype, device=device)
    for block in range(num_blocks):
        frames = slice(block * frames_per_block, (block + 1) * frames_per_block)
        for step in range(num_steps):
            draws[step, :, frames] = torch.randn(block_shape, generator=generator, dtype=dtype,
                                                 device=device)
    return draws


def self_forcing_rollout(
    generator_model: WanDiT,
    scheduler: FlowMatchScheduler,
    context: ContextSource,
    *,
    num_blocks: int,
    frames_per_block: int,
    frame_shape: tuple[int, int, int],
    policy: CachePolicy,
    exit_step: int,
    noise_draws: Tensor,
    grad: bool = True,
    context_per_block: BlockContexts | None = None,
    grad_last_frames: int | None = None,
    writer: CacheWriter | None = None,
    width_offsets: Tensor | None = None,
) -> Tensor:
    """Generate ``num_blocks`` blocks autoregressively with a fresh KV cache (see the module
    docstring).

    Args:
        generator_model: the causal student. context: ``[B, L, text_dim]`` prompt (or its
        :class:`CrossAttentionCache`) for every block,
            unless ``context_per_block`` says otherwise.
        frame_shape: ``(C, H, W)`` of one latent frame. policy: KV-cache policy of the stream
        (``full`` for Self-Forcing; ``downsample`` / a memory
            policy for MAG).
        exit_step: 1-based few-step index whose prediction is the block's output (shared by all
        blocks). noise_draws: ``[S, B, num_blocks * frames_per_block, C, H, W]``, ``S >=
        exit_step``. grad: False runs everything under ``no_grad`` (critic updates only need
        samples). context_per_block: prompt of block ``b`` (a sequence or a function of ``b``), used
        by its
            denoising steps AND its write pass. MAG's history loss generates every chunk after the
            first with the empty text (:func:`mag.objectives.dmd.history_block_contexts`). Each
            distinct object is projected once.
        grad_last_frames: only blocks that start within the last ``grad_last_frames`` frames keep
        the
            gradient of their exit step (Self-Forcing keeps the last 21 frames on long rollouts);
            None keeps every block's.
        writer: runs the clean write pass; default the generator itself (Self-Forcing).
        width_offsets: ``[B, num_blocks * frames_per_block]`` camera position of every frame in
        patches,
            for camera-anchored generators (``dit.camera_rope``); each block's denoising steps and
            its write pass (whichever writer runs it, e.g. the memory model) get their frames'
            slice.

    Returns:
        ``[B, num_blocks * frames_per_block, C, H, W]`` the exit-step x0 predictions of all blocks.
    """
    num_steps = len(scheduler.config.denoising_steps)
    num_frames = num_blocks * frames_per_block
    _check_rollout_args(generator_model, num_blocks, frames_per_block, frame_shape, exit_step,
                        num_steps, noise_draws, num_frames)
    if grad_last_frames is not None and grad_last_frames < 0:
        raise InputError(f"grad_last_frames must be >= 0 or None, got {grad_last_frames}")
    batch = noise_draws.shape[1]
    param = generator_model.patch_embedding.weight
    device, dtype = param.device, param.dtype
    _, ph, pw = generator_model.cfg.patch_size
    cache = KVCache.for_model(generator_model.cfg, policy, tokens_per_frame=(frame_shape[1] // ph)
                              * (frame_shape[2] // pw), horizon_frames=num_frames,
                              frames_per_block=frames_per_block, batch_size=batch, dtype=dtype,
                              device=device)
    if width_offsets is not None:
        if tuple(width_offsets.shape) != (batch, num_frames):
            raise InputError(f"width_offsets must be [{batch}, {num_frames}], got"
                             f" {list(width_offsets.shape)}")
        width_offsets = width_offsets.to(device)
    # Under the mag / bounded policies the memory model (carried by the policy) writes the cache.
    cache_writer: CacheWriter = writer or default_writer(policy, generator_model)
    levels = scheduler.few_step_timesteps().to(device)
    timesteps = [level.expand(batch).contiguous() for level in levels[:exit_step]]
    first_grad_frame = 0 if grad_last_frames is None else num_frames - grad_last_frames
    # Context projections depend on the generator's weights: build them with gradient when asked.
    encoded: dict[int, tuple[ContextSource, CrossAttentionCache]] = {}
    outputs = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for block in range(num_blocks):
            frames = slice(block * frames_per_block, (block + 1) * frames_per_block)
            positions = torch.arange(frames.start, frames.stop, device=device)
            offsets = None if width_offsets is None else width_offsets[:, frames]
            source = context if context_per_block is None else _block_context(context_per_block,
                                                                              block)
            block_context = _encode(generator_model, source, batch, encoded)
            x = noise_draws[_INITIAL_DRAW, :, frames].to(device=device, dtype=dtype)
            with torch.no_grad():
                for step in range(exit_step - 1):
                    out = generator_model(x, timesteps[step], block_context,
                                          frame_positions=positions,
                                          kv_cache=cache, width_offsets=offsets)
                    x0 = scheduler.to_x0(out, x, timesteps[step])
                    fresh = noise_draws[step + 1, :, frames].to(device=device, dtype=dtype)
                    x = scheduler.add_noise(x0, fresh, timesteps[step + 1])
            t_exit = timesteps[exit_step - 1]
            with torch.set_grad_enabled(
                torch.is_grad_enabled() and frames.start >= first_grad_frame
            ):
                out = generator_model(x, t_exit, block_context, frame_positions=positions,
                                      kv_cache=cache, width_offsets=offsets)
                x0 = scheduler.to_x0(out, x, t_exit)
            with torch.no_grad():
                cache_writer.write(cache, x0.detach(), positions, block_context,
                                   width_offsets=offsets)
            outputs.append(x0)
    return torch.cat(outputs, dim=1)


def _block_context(context_per_block: BlockContexts, block: int) -> ContextSource:
    if callable(context_per_block):
        return context_per_block(block)
    if block >= len(context_per_block):
        raise InputError(f"context_per_block has {len(context_per_block)} entries, block {block} "
                         "needs one")
    return context_per_block[block]


def _encode(model: WanDiT, source: ContextSource, batch: int,
            encoded: dict[int, tuple[ContextSource, CrossAttentionCache]]) -> CrossAttentionCache:
    """Project a prompt once per distinct object (keyed by identity; the source is kept alive with
    it)."""
    key = id(source)
    if key not in encoded:
        cache = source if isinstance(source, CrossAttentionCache) else model.encode_context(
            source.to(model.patch_embedding.weight.device))
        if cache.batch_size != batch:
            raise InputError(f"a rollout context has batch {cache.batch_size}, the noise draws "
                             f"have {batch}")
        encoded[key] = (source, cache)
    return encoded[key][1]


def _check_rollout_args(model: WanDiT, num_blocks: int, frames_per_block: int,
                        frame_shape: tuple[int, int, int], exit_step: int, num_steps: int,
                        noise_draws: Tensor, num_frames: int) -> None:
    if num_blocks < 1 or frames_per_block < 1:
        raise InputError("a rollout needs num_blocks >= 1 and frames_per_block >= 1, got "
                         f"{num_blocks},"
                         f" {frames_per_block}")
    if not 1 <= exit_step <= num_steps:
        raise InputError(f"exit_step must be in 1..{num_steps} (the few-step list), got "
                         f"{exit_step}")
    if num_frames > model.cfg.rope_max_positions:
        raise InputError(f"a rollout of {num_frames} frames exceeds dit.rope_max_positions="
                         f"{model.cfg.rope_max_positions}")
    expected = (num_frames, *frame_shape)
    if (
        noise_draws.ndim != 6
        or tuple(noise_draws.shape[2:]) != expected
        or noise_draws.shape[0] < exit_step
    ):
        raise InputError(f"noise_draws must be [S >= {exit_step}, B, {num_frames}, "
                         f"{frame_shape[0]},"
                         f" {frame_shape[1]}, {frame_shape[2]}], got {list(noise_draws.shape)}")
