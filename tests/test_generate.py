"""Prompt switches with KV re-cache (StreamingGenerator.recache), and ``mag generate``: action and prompt
files, the stream it writes, camera steering on the shipped model, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from helpers import CAMERA, TINY_OVERRIDES, random_dit

from mag.cache import KVCache
from mag.config import get_preset
from mag.models.attention import block_causal_mask
from mag.pipelines import SamplerConfig, StreamingGenerator, policy_from_name
from mag.schedulers import FlowMatchScheduler

# Cached streaming vs a masked full forward: float32 summation order differs, nothing else.
ATOL = 1e-5
# Latent frames per block in the tiny preset; the window policy keeps 3 sinks + 9 frames (4 blocks).
BLOCK = 3
WINDOW_BLOCKS = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores are shared with other jobs: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def preset():
    return get_preset("tiny", **TINY_OVERRIDES, **CAMERA)


@pytest.fixture(scope="module")
def model(preset):
    return random_dit(preset.dit, seed=1)


def _prompts(preset) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return tuple(torch.randn(1, 4, preset.dit.text_dim, generator=gen) for _ in range(2))


def _latents(preset, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents ``[1, frames, C, H, W]`` and a camera track ``[1, frames]`` (patches) moving right."""
    gen = torch.Generator().manual_seed(9)
    video = preset.video
    x = torch.randn(1, frames, video.latent_channels, video.latent_height, video.latent_width, generator=gen)
    return x, torch.arange(frames, dtype=torch.float32)[None] * 0.5


def _stream(model, preset, policy: str, context, latents, offsets, **kwargs) -> StreamingGenerator:
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    gen = StreamingGenerator(model, scheduler, preset, policy_from_name(policy, preset, **kwargs),
                             sampler=SamplerConfig("euler", 2))
    gen.reset(1, latents.shape[1] + BLOCK)
    gen.set_prompt(context)
    gen.feed(latents, offsets)
    return gen


def _cached(cache: KVCache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """RoPE position -> (K, V) of every cached frame, whatever slot it sits in."""
    tokens = cache.tokens_per_frame
    out = {}
    for slot, position in zip(cache.valid_slots, cache.cached_positions().tolist(), strict=True):
        rows = slice(slot * tokens, (slot + 1) * tokens)
        out[position] = (cache.k[:, :, :, rows].clone(), cache.v[:, :, :, rows].clone())
    return out


def test_recache_without_eviction_equals_a_stream_with_the_new_prompt_from_the_start(model, preset):
    old, new = _prompts(preset)
    latents, offsets = _latents(preset, WINDOW_BLOCKS * BLOCK)
    switched = _stream(model, preset, "window", old, latents, offsets)
    before = _cached(switched.cache)
    switched.recache(new)
    reference = _stream(model, preset, "window", new, latents, offsets)
    after, want = _cached(switched.cache), _cached(reference.cache)
    assert sorted(after) == sorted(want) == list(range(WINDOW_BLOCKS * BLOCK))
    assert switched.cache.valid_slots == reference.cache.valid_slots
    assert (switched.cache.frames_seen, switched.cache.frames_retained) == (reference.cache.frames_seen,
                                                                            reference.cache.frames_retained)
    # The prompt reaches the cached K/V (after the first layer), so the equality below is not vacuous.
    assert not torch.allclose(before[WINDOW_BLOCKS * BLOCK - 1][0], want[WINDOW_BLOCKS * BLOCK - 1][0])
    for position, (k, v) in want.items():
        torch.testing.assert_close(after[position][0], k, atol=ATOL, rtol=0)
        torch.testing.assert_close(after[position][1], v, atol=ATOL, rtol=0)
    block_offsets = offsets[:, -BLOCK:] + BLOCK * 0.5
    a = switched.generate_block(torch.Generator().manual_seed(2), block_offsets)
    b = reference.generate_block(torch.Generator().manual_seed(2), block_offsets)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_recache_after_eviction_rewrites_the_retained_blocks_block_causally(model, preset):
    """7 blocks into a 4-block window: the sinks and the last 3 blocks are rewritten under the new prompt,
    each reading the rewritten blocks before it. Reference: one masked full forward over those frames."""
    old, new = _prompts(preset)
    blocks = 7
    latents, offsets = _latents(preset, blocks * BLOCK)
    gen = _stream(model, preset, "window", old, latents, offsets)
    positions_before = sorted(_cached(gen.cache))
    slots_before = gen.cache.valid_slots
    gen.recache(new)
    assert sorted(_cached(gen.cache)) == positions_before and gen.cache.valid_slots == slots_before
    kept = [0, 1, 2, *range((blocks - 3) * BLOCK, blocks * BLOCK)]
    assert positions_before == kept
    # One denoising read of the next block through the rewritten cache ...
    noisy = torch.randn(1, BLOCK, *latents.shape[2:], generator=torch.Generator().manual_seed(3))
    t = torch.full((1,), 500.0)
    next_positions = torch.arange(blocks * BLOCK, (blocks + 1) * BLOCK)
    next_offsets = torch.arange(blocks * BLOCK, (blocks + 1) * BLOCK, dtype=torch.float32)[None] * 0.5
    with torch.no_grad():
        cached = model(noisy, t, new, frame_positions=next_positions, kv_cache=gen.cache,
                       width_offsets=next_offsets)
        # ... equals the full forward over [kept clean frames at t=0 ; noisy block], block-causal.
        frames = torch.cat([latents[:, kept], noisy], 1)
        steps = torch.cat([torch.zeros(1, len(kept)), t.expand(1, BLOCK)], 1)
        full = model(frames, steps, new, frame_positions=torch.tensor([*kept, *next_positions.tolist()]),
                     frame_mask=block_causal_mask(len(kept) + BLOCK, BLOCK),
                     width_offsets=torch.cat([offsets[:, kept], next_offsets], 1))
    torch.testing.assert_close(cached, full[:, -BLOCK:], atol=ATOL, rtol=0)
    # Later writes land in the slots the policy would have used without the switch.
    gen.generate_block(torch.Generator().manual_seed(4), next_offsets)
    assert sorted(_cached(gen.cache)) == [0, 1, 2, *range((blocks - 2) * BLOCK, (blocks + 1) * BLOCK)]


def test_recache_under_mag_keeps_the_prompt_free_memory(model, preset):
    """The memory model writes with the empty prompt: a switch changes the prompt, not the cache."""
    old, new = _prompts(preset)
    memory = random_dit(preset.dit, seed=2)
    empty = torch.zeros(1, 1, preset.dit.text_dim)
    latents, offsets = _latents(preset, 5 * BLOCK)
    gen = _stream(model, preset, "mag", old, latents, offsets, memory_model=memory, empty_context=empty)
    k, v, context_k = gen.cache.k.clone(), gen.cache.v.clone(), gen.context.k.clone()
    gen.recache(new)
    assert torch.equal(gen.cache.k, k) and torch.equal(gen.cache.v, v)
    assert not torch.allclose(gen.context.k, context_k)
