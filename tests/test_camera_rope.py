"""Camera-anchored RoPE: width positions become world columns; everything else is unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mag.cache import FullPolicy, KVCache
from mag.errors import InputError
from mag.models import WanDiT, block_causal_mask


def _pair(make_dit):
    plain = make_dit()
    anchored = WanDiT(dataclasses.replace(plain.cfg, camera_rope=True)).eval()
    anchored.load_state_dict(plain.state_dict())
    return plain, anchored


def test_zero_offsets_equal_plain_rope(make_dit):
    plain, anchored = _pair(make_dit)
    x, ctx = torch.randn(2, 3, 4, 4, 6), torch.randn(2, 5, 16)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ref = plain(x, t, ctx)
        out = anchored(x, t, ctx, width_offsets=torch.zeros(2, 3))
    assert (ref - out).abs().max() <= 1e-5


def test_a_common_shift_of_all_offsets_changes_nothing(make_dit):
    """Attention sees only relative world columns, so moving the whole world is a no-op."""
    _, anchored = _pair(make_dit)
    x, ctx = torch.randn(1, 6, 4, 4, 6), torch.randn(1, 5, 16)
    offsets = torch.tensor([[0.0, 1, 2, 2, 1, 0]])
    mask = block_causal_mask(6, 3)
    with torch.no_grad():
        a = anchored(x, torch.zeros(1), ctx, width_offsets=offsets, frame_mask=mask)
        b = anchored(x, torch.zeros(1), ctx, width_offsets=offsets + 7.0, frame_mask=mask)
        c = anchored(x, torch.zeros(1), ctx, width_offsets=offsets * 2, frame_mask=mask)
    assert (a - b).abs().max() <= 1e-4
    assert (a - c).abs().max() > 1e-3  # but relative camera motion matters


def test_streaming_with_anchored_keys_equals_full_forward(make_dit):
    _, model = _pair(make_dit)
    frames, fpb = 9, 3
    x, ctx = torch.randn(1, frames, 4, 4, 6), torch.randn(1, 5, 16)
    offsets = torch.tensor([[0.0, 1, 2, 3, 3, 2, 1, 0, -1]])
    with torch.no_grad():
        ref = model(x, torch.zeros(1), ctx, width_offsets=offsets,
                    frame_mask=block_causal_mask(frames, fpb))
        cache = KVCache.for_model(model.cfg, FullPolicy(), tokens_per_frame=6,
                                  horizon_frames=frames, frames_per_block=fpb)
        for b in range(3):
            sl = slice(b * fpb, (b + 1) * fpb)
            out = model(x[:, sl], torch.zeros(1), ctx, frame_positions=range(sl.start, sl.stop),
                        width_offsets=offsets[:, sl], kv_cache=cache, cache_write=True)
            assert (out - ref[:, sl]).abs().max() <= 1e-5


def test_offsets_are_required_exactly_when_anchored(make_dit):
    plain, anchored = _pair(make_dit)
    x, ctx = torch.randn(1, 3, 4, 4, 6), torch.randn(1, 5, 16)
    with pytest.raises(InputError, match="camera_rope"):
        anchored(x, torch.zeros(1), ctx)
    with pytest.raises(InputError, match="camera_rope=False"):
        plain(x, torch.zeros(1), ctx, width_offsets=torch.zeros(1, 3))


def test_streaming_generator_passes_camera_positions_to_both_phases(make_dit):
    """feed + teacher-forced prediction on a camera-anchored model == the [clean ; noisy] pass."""
    from mag.config import get_preset
    from mag.objectives.flow_matching import teacher_forcing_mask
    from mag.pipelines import SamplerConfig, StreamingGenerator, policy_from_name
    from mag.schedulers import FlowMatchScheduler

    _, model = _pair(make_dit)
    preset = get_preset("tiny", **{"video.height": 4, "video.width": 6, "video.latent_channels": 4,
                                   "dit.in_channels": 4, "dit.out_channels": 4,
                                   "dit.patch_size": [1, 2, 2]})
    scheduler = FlowMatchScheduler(preset.scheduler, "velocity")
    gen = StreamingGenerator(model, scheduler, preset, policy_from_name("full", preset),
                             sampler=SamplerConfig(kind="euler", steps=1))
    x, ctx = torch.randn(1, 6, 4, 4, 6), torch.randn(1, 5, 16)
    offsets = torch.tensor([[0.0, 1, 2, 2, 1, 0]])
    gen.reset(1, 6)
    gen.set_prompt(ctx)
    gen.feed(x[:, :3], offsets[:, :3])
    noise = torch.Generator().manual_seed(0)
    predicted = gen.predict_block_teacher_forced(x[:, 3:], noise, offsets[:, 3:])
    # Reference: Euler with one step from t=1000 is x0 = noise - v; rebuild it from the parallel
    # pass.
    start = torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    seq = torch.cat([x, torch.cat([x[:, :3], start], 1)], 1)
    t = torch.tensor([[0.0] * 9 + [1000.0] * 3])
    with torch.no_grad():
        v = model(seq, t, ctx, frame_positions=torch.arange(6).repeat(2),
                  frame_mask=teacher_forcing_mask(6, 3), width_offsets=offsets.repeat(1, 2))[:, 9:]
    assert (predicted - (start - v)).abs().max() <= 1e-5
