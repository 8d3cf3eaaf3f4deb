"""The streaming generator must equal full masked forwards over the sequence it builds."""

from __future__ import annotations

import pytest
import torch
from helpers import random_dit

from mag.cache import DownsamplePolicy, FullPolicy, WindowPolicy
from mag.checkpoint import TrainingState, save_checkpoint
from mag.config import get_preset
from mag.errors import CheckpointError, ConfigError, InputError
from mag.models import WanDiT, block_causal_mask
from mag.objectives.flow_matching import teacher_forcing_mask
from mag.pipelines import (
    SamplerConfig,
    StreamingGenerator,
    load_generator,
    policy_from_name,
    writer_for,
)
from mag.schedulers import FlowMatchScheduler

TOLERANCE = 1e-5
BATCH = 2
TEXT_TOKENS = 3
# 8x8 frames with 4x4 patches: 4 tokens per frame, blocks of 3 frames.
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "dit.text_dim": 16,
         "dit.freq_dim": 16, "dit.rope_max_positions": 64, "video.height": 8, "video.width": 8}


def _preset(**extra):
    return get_preset("tiny", **{**SMALL, **extra})


def _random_model(preset, seed: int = 0) -> WanDiT:
    return random_dit(preset.dit, seed)


def _setup(preset, policy, sampler=None, horizon=12):
    model = _random_model(preset)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    gen = StreamingGenerator(model, scheduler, preset, policy, sampler=sampler)
    gen.reset(BATCH, horizon)
    text = torch.randn(BATCH, TEXT_TOKENS, preset.dit.text_dim,
                       generator=torch.Generator().manual_seed(5))
    return model, scheduler, gen, text


def _frame_shape(preset):
    return (preset.video.latent_channels, preset.video.height, preset.video.width)


def _reference_block(model, scheduler, sampler, history, text, uncond, generator, frames_per_block):
    """Denoise one block with full block-causal forwards over ``[history ; block]`` (no cache)."""
    batch = history.shape[0]
    shape = (batch, frames_per_block, *history.shape[2:])
    x = torch.randn(shape, generator=generator)
    total = history.shape[1] + frames_per_block
    mask = block_causal_mask(total, frames_per_block)
    if sampler.kind == "few_step":
        levels = list(scheduler.few_step_timesteps())
        pairs = [(t, levels[i + 1] if i + 1 < len(levels) else None) for i, t in enumerate(levels)]
    else:
        levels = list(scheduler.sampling_timesteps(sampler.steps)) + [torch.tensor(0.0)]
        pairs = list(zip(levels[:-1], levels[1:], strict=True))

    def run(sample, t, context):
        timesteps = torch.cat([torch.zeros(batch, history.shape[1]), t.expand(batch,
                                                                              frames_per_block)], 1)
        out = model(torch.cat([history, sample], 1), timesteps, context, frame_mask=mask)
        return out[:, -frames_per_block:]

    for t, t_next in pairs:
        tb = t.expand(batch)
        out = run(x, t, text)
        if sampler.uses_guidance:
            un = run(x, t, uncond)
            out = un + sampler.guidance_scale * (out - un)
        if sampler.kind == "few_step":
            x0 = scheduler.to_x0(out, x, tb)
            x = x0 if t_next is None else scheduler.renoise(x0, t_next.expand(batch), generator)
        else:
            x = scheduler.step_euler(scheduler.to_velocity(out, x, tb), x, tb, t_next.expand(batch))
    return x


@pytest.mark.parametrize("sampler", [SamplerConfig(), SamplerConfig("euler", steps=3),
                                     SamplerConfig(guidance_scale=2.5)], ids=["few_step", "euler",
                                                                              "cfg"])
def test_full_policy_stream_equals_growing_block_causal_forward(sampler):
    preset = _preset()
    num_blocks, f = 4, preset.cache.frames_per_block
    model, scheduler, gen, text = _setup(preset, FullPolicy(), sampler, horizon=num_blocks * f)
    uncond = torch.zeros_like(text)
    gen.set_prompt(text, uncond if sampler.uses_guidance else None)
    stream_gen, ref_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    history = torch.zeros(BATCH, 0, *_frame_shape(preset))
    worst = 0.0
    with torch.no_grad():
        for _ in range(num_blocks):
            block = gen.generate_block(stream_gen)
            ref = _reference_block(model, scheduler, sampler, history, text, uncond, ref_gen, f)
            worst = max(worst, (block - ref).abs().max().item())
            history = torch.cat([history, ref], 1)
    assert worst <= TOLERANCE
    assert history.abs().max() > 0.1  # the outputs are not trivially zero
    assert gen.position == num_blocks * f
    assert gen.cache.num_valid_frames == num_blocks * f


def test_feed_then_teacher_forced_prediction_equals_teacher_forcing_mask_forward():
    # One-step sampler: each prediction is a single x0 pass, which is what the parallel
    # [clean ; noisy] teacher-forcing forward computes for every block at once.
    preset = _preset(**{"scheduler.denoising_steps": (1000,)})
    num_blocks, f = 4, preset.cache.frames_per_block
    frames = num_blocks * f
    model, scheduler, gen, text = _setup(preset, FullPolicy(), horizon=frames)
    gen.set_prompt(text)
    clean = torch.randn(BATCH, frames, *_frame_shape(preset),
                        generator=torch.Generator().manual_seed(2))
    noise_gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        gen.feed(clean[:, :f])
        predictions = [gen.predict_block_teacher_forced(clean[:, b * f:(b + 1) * f], noise_gen)
                       for b in range(1, num_blocks)]
        replay = torch.Generator().manual_seed(11)
        noise = torch.cat([torch.zeros(BATCH, f, *_frame_shape(preset))]
                          + [torch.randn(BATCH, f, *_frame_shape(preset), generator=replay)
                             for _ in range(1, num_blocks)], 1)
        t = scheduler.few_step_timesteps()[0]
        timesteps = torch.cat([torch.zeros(BATCH, frames), t.expand(BATCH, frames)], 1)
        out = model(torch.cat([clean, noise], 1), timesteps, text,
                    frame_positions=torch.arange(frames).repeat(2),
                    frame_mask=teacher_forcing_mask(frames, f))[:, frames + f:]
    expected = scheduler.to_x0(out, noise[:, f:], t.expand(BATCH))
    assert (torch.cat(predictions, 1) - expected).abs().max().item() <= TOLERANCE
    # The cache holds the TRUE blocks, not the predictions.
    assert gen.cache.num_valid_frames == frames


def test_teacher_forced_multistep_prediction_reads_true_history():
    preset = _preset()
    f = preset.cache.frames_per_block
    model, scheduler, gen, text = _setup(preset, FullPolicy(), horizon=3 * f)
    gen.set_prompt(text)
    clean = torch.randn(BATCH, 3 * f, *_frame_shape(preset),
                        generator=torch.Generator().manual_seed(4))
    stream_gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        gen.feed(clean[:, :f])
        first = gen.predict_block_teacher_forced(clean[:, f:2 * f], stream_gen)
        second = gen.predict_block_teacher_forced(clean[:, 2 * f:], stream_gen)
        ref_first = _reference_block(model, scheduler, gen.sampler, clean[:, :f], text, None,
                                     ref_gen, f)
        ref_second = _reference_block(model, scheduler, gen.sampler, clean[:, :2 * f], text, None,
                                      ref_gen, f)
    assert (first - ref_first).abs().max().item() <= TOLERANCE
    assert (second - ref_second).abs().max().item() <= TOLERANCE
    # prediction differs from what was written
    assert (first - clean[:, f:2 * f]).abs().max() > 1e-2


def test_window_policy_kv_bytes_stay_constant_after_the_window_fills():
    preset = _preset()
    f = preset.cache.frames_per_block
    policy = policy_from_name("window", preset)
    num_blocks = 8
    _, _, gen, text = _setup(preset, policy, horizon=num_blocks * f)
    gen.set_prompt(text)
    sizes = []
    with torch.no_grad():
        for _ in range(num_blocks):
            gen.generate_block(torch.Generator().manual_seed(0))
            sizes.append(gen.cache.nbytes)
    full_after = (policy.sink_frames + policy.window_frames) // f  # blocks until the ring is full
    assert sizes[:full_after] == sorted(set(sizes[:full_after]))  # grows while filling
    assert len(set(sizes[full_after - 1:])) == 1
    assert sizes[-1] == (policy.sink_frames + policy.window_frames) * gen.cache.bytes_per_frame


def test_policy_names_resolve_from_the_preset():
    preset = _preset()
    assert isinstance(policy_from_name("full", preset), FullPolicy)
    window = policy_from_name("window", preset)
    assert isinstance(window, WindowPolicy)
    assert window.sink_frames == preset.cache.sink_frames
    assert window.window_frames == preset.cache.window_frames
    assert isinstance(policy_from_name("downsample", preset), DownsamplePolicy)


def test_unknown_or_unavailable_policy_is_a_config_error():
    preset = _preset()
    with pytest.raises(ConfigError, match="unknown cache policy 'lru'.*full, window, downsample"):
        policy_from_name("lru", preset)
    with pytest.raises(ConfigError, match="memory model.*available policies: full, window, "
                                          "downsample"):
        writer_for(policy_from_name("mag", preset))
    with pytest.raises(ConfigError, match="memory model"):
        writer_for(policy_from_name("bounded", preset))


def test_stream_misuse_names_what_was_expected():
    preset = _preset()
    _, _, gen, text = _setup(preset, FullPolicy(), horizon=6)
    with pytest.raises(InputError, match="no prompt set"):
        gen.generate_block()
    gen.set_prompt(text)
    with pytest.raises(InputError, match="whole blocks of 3 frames"):
        gen.feed(torch.zeros(BATCH, 2, *_frame_shape(preset)))
    gen.feed(torch.zeros(BATCH, 6, *_frame_shape(preset)))
    with pytest.raises(InputError, match="reset for 6 frames"):
        gen.generate_block()
    with pytest.raises(ConfigError, match="euler sampler needs steps"):
        SamplerConfig("euler").validate()
    guided = StreamingGenerator(gen.model, gen.scheduler, preset, FullPolicy(),
                                sampler=SamplerConfig(guidance_scale=3.0))
    guided.reset(BATCH, 3)
    with pytest.raises(InputError, match="uncond_context"):
        guided.set_prompt(text)


def _save(tmp_path, preset, model, ema=None):
    state = TrainingState(step=5, model=model.state_dict(), ema=ema, optimizer=None, rng={},
                          metadata={"preset": preset.to_dict(), "kind": "training"}, extra={})
    return save_checkpoint(tmp_path, state)


def test_load_generator_prefers_ema_weights(tmp_path):
    preset = _preset()
    model = _random_model(preset, seed=1)
    ema = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    loaded, loaded_preset, metadata = load_generator(_save(tmp_path / "ema", preset, model, ema))
    assert loaded_preset == preset
    assert metadata["kind"] == "training"
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in loaded.parameters())
    raw, _, _ = load_generator(_save(tmp_path / "raw", preset, model))
    assert torch.equal(raw.head.head.weight, model.head.head.weight)


def test_load_generator_rejects_missing_corrupt_and_mismatched_files(tmp_path):
    with pytest.raises(CheckpointError, match="none.safetensors"):
        load_generator(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_generator(bad)
    preset = _preset()
    other = _preset(**{"dit.num_layers": 1})
    path = _save(tmp_path / "mismatch", other, _random_model(preset))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_generator(path)
