"""Cached block-by-block streaming must equal one full forward with the equivalent frame mask."""

from __future__ import annotations

import pytest
import torch

from mag.cache import (
    DownsamplePolicy,
    FullPolicy,
    KVCache,
    MagPolicy,
    WindowPolicy,
    kv_bytes_per_frame,
    valid_slot_positions,
)
from mag.errors import InputError
from mag.models import block_causal_mask, last_frame_memory_mask, sink_window_mask

BATCH, HEIGHT, WIDTH = 2, 4, 6  # 2 x 3 = 6 tokens per frame with (2, 2) patches
FRAMES_PER_BLOCK = 3
TOLERANCE = 1e-5


def _stream_vs_mask(model, policy, frame_mask, num_blocks: int) -> tuple[float, KVCache]:
    """Stream blocks (noisy read pass, then clean write pass) and return the worst deviation from
    the full-sequence forward under ``frame_mask`` (teacher forcing: earlier blocks clean at
    t=0)."""
    cfg = model.cfg
    frames = num_blocks * FRAMES_PER_BLOCK
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(BATCH, frames, cfg.in_channels, HEIGHT, WIDTH, generator=gen)
    noisy = torch.randn(BATCH, frames, cfg.in_channels, HEIGHT, WIDTH, generator=gen)
    cross = model.encode_context(torch.randn(BATCH, 5, cfg.text_dim, generator=gen))
    tokens = (HEIGHT // 2) * (WIDTH // 2)
    cache = KVCache.for_model(cfg, policy, tokens_per_frame=tokens, horizon_frames=frames,
                              frames_per_block=FRAMES_PER_BLOCK, batch_size=BATCH)
    zeros = torch.zeros(BATCH, frames)
    worst = 0.0
    with torch.no_grad():
        clean_ref = model(clean, zeros, cross, frame_mask=frame_mask)
        for b in range(num_blocks):
            block = slice(b * FRAMES_PER_BLOCK, (b + 1) * FRAMES_PER_BLOCK)
            positions = range(block.start, block.stop)
            t = torch.tensor([900.0 - 150 * b, 400.0 + 50 * b])
            x_ref, t_ref = clean.clone(), zeros.clone()
            x_ref[:, block], t_ref[:, block] = noisy[:, block], t[:, None]
            noisy_ref = model(x_ref, t_ref, cross, frame_mask=frame_mask)[:, block]
            noisy_out = model(noisy[:, block], t, cross, frame_positions=positions, kv_cache=cache)
            clean_out = model(clean[:, block], torch.zeros(BATCH), cross, frame_positions=positions,
                              kv_cache=cache, cache_write=True)
            worst = max(worst, (noisy_out - noisy_ref).abs().max().item(),
                        (clean_out - clean_ref[:, block]).abs().max().item())
    return worst, cache


@pytest.mark.parametrize("execution", ["dense", "grouped"])
def test_full_cache_streaming_equals_block_causal_forward(make_dit, execution):
    model = make_dit()
    model.mask_execution = execution  # how the full-sequence reference runs its mask
    num_blocks = 4
    mask = block_causal_mask(num_blocks * FRAMES_PER_BLOCK, FRAMES_PER_BLOCK)
    worst, cache = _stream_vs_mask(model, FullPolicy(), mask, num_blocks)
    assert worst <= TOLERANCE
    assert cache.num_valid_frames == num_blocks * FRAMES_PER_BLOCK
    assert valid_slot_positions(cache) == list(range(num_blocks * FRAMES_PER_BLOCK))


def test_window_cache_streaming_equals_sink_window_forward_after_eviction(make_dit):
    model = make_dit()
    # window not a multiple of the block: the ring wraps mid-block
    num_blocks, sink, window = 6, 3, 4
    frames = num_blocks * FRAMES_PER_BLOCK
    mask = sink_window_mask(frames, FRAMES_PER_BLOCK, sink, window)
    worst, cache = _stream_vs_mask(model, WindowPolicy(sink, window), mask, num_blocks)
    assert worst <= TOLERANCE
    assert cache.frames_retained > cache.capacity_frames  # eviction really happened
    assert sorted(valid_slot_positions(cache)) == [0, 1, 2, 14, 15, 16, 17]
    # The window must matter: the same stream under the plain block-causal mask gives other outputs.
    x = torch.randn(1, frames, model.cfg.in_channels, HEIGHT, WIDTH)
    ctx = torch.randn(1, 5, model.cfg.text_dim)
    with torch.no_grad():
        windowed = model(x, torch.zeros(1), ctx, frame_mask=mask)[:, -FRAMES_PER_BLOCK:]
        causal = model(x, torch.zeros(1), ctx, frame_mask=block_causal_mask(frames,
                                                                            FRAMES_PER_BLOCK))
    assert (windowed - causal[:, -FRAMES_PER_BLOCK:]).abs().max() > 1e-3


def test_downsample_cache_streaming_equals_last_frame_memory_forward(make_dit):
    model = make_dit()
    num_blocks = 4
    mask = last_frame_memory_mask(num_blocks * FRAMES_PER_BLOCK, FRAMES_PER_BLOCK)
    worst, cache = _stream_vs_mask(model, DownsamplePolicy(), mask, num_blocks)
    assert worst <= TOLERANCE
    # last frame of each block, own RoPE position
    assert valid_slot_positions(cache) == [2, 5, 8, 11]
    assert cache.nbytes == num_blocks * cache.bytes_per_frame


def test_bounded_downsample_with_sinks_equals_its_mask(make_dit):
    model = make_dit()
    num_blocks, sink, slots = 5, 3, 2
    frames = num_blocks * FRAMES_PER_BLOCK
    # Sinks, plus the last frame of the 2 most recent earlier blocks.
    mask = last_frame_memory_mask(frames, FRAMES_PER_BLOCK, sink) & sink_window_mask(
        frames, FRAMES_PER_BLOCK, sink, slots * FRAMES_PER_BLOCK)
    worst, cache = _stream_vs_mask(model, DownsamplePolicy(sink, memory_slots=slots), mask,
                                   num_blocks)
    assert worst <= TOLERANCE
    assert sorted(valid_slot_positions(cache)) == [0, 1, 2, 11, 14]  # ring of 2 kept the newest


def test_cache_bytes_count_valid_entries_only(tiny_dit_cfg):
    cache = KVCache.for_model(tiny_dit_cfg, FullPolicy(), tokens_per_frame=6, horizon_frames=9,
                              frames_per_block=3, dtype=torch.bfloat16)
    per_frame = 2 * tiny_dit_cfg.num_layers * 6 * tiny_dit_cfg.dim * 2
    assert cache.bytes_per_frame == per_frame
    assert cache.capacity_bytes == 9 * per_frame
    assert cache.nbytes == 0


def test_full_cache_overflow_is_a_clear_error(make_dit):
    model = make_dit()
    cache = KVCache.for_model(model.cfg, FullPolicy(), tokens_per_frame=6, horizon_frames=3,
                              frames_per_block=3)
    x, ctx = torch.randn(1, 3, 4, HEIGHT, WIDTH), torch.randn(1, 5, model.cfg.text_dim)
    with torch.no_grad():
        model(x, torch.zeros(1), ctx, kv_cache=cache, cache_write=True)
        with pytest.raises(InputError, match="full KV cache holds 3 frames"):
            model(x, torch.zeros(1), ctx, frame_positions=range(3, 6), kv_cache=cache,
                  cache_write=True)


def test_reset_empties_the_cache(make_dit):
    model = make_dit()
    cache = KVCache.for_model(model.cfg, WindowPolicy(0, 3), tokens_per_frame=6, horizon_frames=9,
                              frames_per_block=3)
    with torch.no_grad():
        model(torch.randn(1, 3, 4, HEIGHT, WIDTH), torch.zeros(1), torch.randn(1, 5,
                                                                               model.cfg.text_dim),
              kv_cache=cache, cache_write=True)
    assert cache.num_valid_frames == 3
    cache.reset()
    assert (cache.num_valid_frames, cache.frames_seen, cache.nbytes) == (0, 0, 0)


@pytest.mark.parametrize("execution", ["dense", "grouped"])
def test_frame_mask_over_cached_frames_matches_full_forward(make_dit, execution):
    # Block 2 reads a full cache of blocks 0-1 but may not see cached frame 1.
    model = make_dit()
    model.mask_execution = execution
    frames = 3 * FRAMES_PER_BLOCK
    x = torch.randn(1, frames, model.cfg.in_channels, HEIGHT, WIDTH)
    ctx = torch.randn(1, 5, model.cfg.text_dim)
    full_mask = block_causal_mask(frames, FRAMES_PER_BLOCK)
    full_mask[6:, 1] = False
    cache = KVCache.for_model(model.cfg, FullPolicy(), tokens_per_frame=6, horizon_frames=frames,
                              frames_per_block=FRAMES_PER_BLOCK)
    with torch.no_grad():
        reference = model(x, torch.zeros(1), ctx, frame_mask=full_mask)[:, 6:]
        for b in range(2):
            model(x[:, 3 * b:3 * b + 3], torch.zeros(1), ctx, frame_positions=range(3 * b,
                                                                                    3 * b + 3),
                  kv_cache=cache, cache_write=True)
        streamed = model(x[:, 6:], torch.zeros(1), ctx, frame_positions=range(6, 9), kv_cache=cache,
                         frame_mask=full_mask[6:])
        unmasked = model(x[:, 6:], torch.zeros(1), ctx, frame_positions=range(6, 9), kv_cache=cache)
    assert (streamed - reference).abs().max() <= TOLERANCE
    assert (unmasked - reference).abs().max() > 1e-3


def test_hiding_a_prefix_equals_masking_it(make_dit):
    """Reading past the first cached frames gives the attention a frame mask hiding them gives."""
    model = make_dit()
    cache = KVCache.for_model(model.cfg, FullPolicy(), tokens_per_frame=6, horizon_frames=9,
                              frames_per_block=3)
    ctx = torch.randn(1, 5, model.cfg.text_dim)
    block = torch.randn(1, 3, 4, HEIGHT, WIDTH)
    with torch.no_grad():
        model(torch.randn(1, 3, 4, HEIGHT, WIDTH), torch.zeros(1), ctx, kv_cache=cache,
              cache_write=True)
        mask = torch.ones(3, 6, dtype=torch.bool)
        mask[:, :2] = False
        masked = model(block, torch.full((1,), 500.0), ctx, frame_positions=range(3, 6),
                       kv_cache=cache, frame_mask=mask)
        with cache.hiding_prefix(2):
            assert cache.num_valid_frames == 1 and cache.cached_positions().tolist() == [2]
            skipped = model(block, torch.full((1,), 500.0), ctx, frame_positions=range(3, 6),
                            kv_cache=cache)
        assert cache.num_valid_frames == 3
    assert (masked - skipped).abs().max() <= 1e-5
    with pytest.raises(InputError, match="cannot hide 4 of 3"), cache.hiding_prefix(4):
        pass


@pytest.mark.parametrize("policy", [FullPolicy(), WindowPolicy(3, 9), DownsamplePolicy(3),
                                    DownsamplePolicy(3, memory_slots=4), DownsamplePolicy(0,
                                                                                          memory_slots=2)],
                         ids=["full", "window", "downsample", "bounded", "bounded-no-sinks"])
def test_every_read_is_a_view_of_the_storage_even_after_a_ring_wraps(policy):
    """Reads follow slot order, and every policy keeps its valid slots a prefix: no gather, ever."""
    blocks, block = 12, 3
    cache = KVCache(policy, num_layers=1, num_heads=1, head_dim=2, tokens_per_frame=2,
                    capacity_frames=policy.capacity_frames(blocks * block, block))
    for b in range(blocks):
        cache.commit(cache.begin_write(block), torch.arange(b * block, (b + 1) * block))
        k, v = cache.read(0)
        assert k._base is cache.k and v._base is cache.v, b
        assert k.shape[2] == cache.num_valid_frames * cache.tokens_per_frame
    assert len(set(valid_slot_positions(cache))) == cache.num_valid_frames


@pytest.mark.parametrize("policy", [FullPolicy(), WindowPolicy(2, 6), DownsamplePolicy(2),
                                    DownsamplePolicy(2, memory_slots=3), MagPolicy(2),
                                    MagPolicy(2, memory_slots=3)],
                         ids=["full", "window", "downsample", "bounded-downsample", "mag",
                              "bounded"])
def test_kv_bytes_at_batch_above_one_equal_the_cache_tensors_own_nbytes(policy, tiny_dit_cfg):
    """The accounting is checked against the storage itself, at batch 3 and in bfloat16: a size
    formula that drops the batch (or the dtype) cannot cancel out here as it does in a mag-vs-full
    ratio."""
    blocks, block, batch, tokens, dtype = 5, 3, 3, 5, torch.bfloat16
    cfg = tiny_dit_cfg
    cache = KVCache.for_model(cfg, policy, tokens_per_frame=tokens, horizon_frames=blocks * block,
                              frames_per_block=block, batch_size=batch, dtype=dtype)
    assert cache.capacity_bytes == cache.k.nbytes + cache.v.nbytes
    gen = torch.Generator().manual_seed(0)
    shape = (batch, cfg.num_heads, block * tokens, cfg.head_dim)
    for b in range(blocks):
        pending = cache.begin_write(block)
        for layer in range(cfg.num_layers):
            cache.write(layer, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                        pending)
        cache.commit(pending, torch.arange(b * block, (b + 1) * block))
        held = sum(k.nbytes + v.nbytes for k, v in map(cache.read, range(cfg.num_layers)))
        assert cache.nbytes == held > 0, b
    # The allocation-free formula the speed benchmark and `mag info` use agrees with the storage.
    per_frame = held // cache.num_valid_frames
    assert kv_bytes_per_frame(cfg, tokens, dtype,
                              batch_size=batch) == cache.bytes_per_frame == per_frame
