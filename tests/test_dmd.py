"""Self-Forcing DMD: the generator gradient, where the rollout's gradient flows, the critic
schedule, MAG's history loss and the λ mix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mag.cache import FullPolicy, KVCache
from mag.config import SchedulerConfig, get_preset
from mag.errors import ConfigError, InputError
from mag.objectives.dmd import (
    DMDStepConfig,
    DMDUpdateSchedule,
    combine,
    critic_flow_matching_loss,
    dmd_generator_loss,
    dmd_gradient,
    draw_history_choice,
    history_block_contexts,
    history_loss,
    score_windows,
    x0_predictor,
)
from mag.objectives.flow_matching import teacher_flow_matching_loss
from mag.pipelines import GeneratorWriter, StreamingGenerator
from mag.pipelines.rollout import draw_exit_step, draw_rollout_noise, self_forcing_rollout
from mag.schedulers import FlowMatchScheduler

BATCH = 2
FRAMES_PER_BLOCK = 3
NUM_BLOCKS = 3
# make_dit's TINY_DIT: 4 channels, 2x2 patches -> 4x4 latents are 4 tokens per frame.
FRAME_SHAPE = (4, 4, 4)
TEXT_TOKENS = 3
TEXT_DIM = 16
EXACT = 1e-6
CLOSE = 1e-5


@pytest.fixture
def scheduler() -> FlowMatchScheduler:
    return FlowMatchScheduler(SchedulerConfig(shift=3.0), "velocity")


def _text(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def _draws(scheduler: FlowMatchScheduler, num_blocks: int = NUM_BLOCKS,
           seed: int = 1) -> torch.Tensor:
    return draw_rollout_noise(BATCH, num_blocks, FRAMES_PER_BLOCK, FRAME_SHAPE,
                              len(scheduler.config.denoising_steps),
                              torch.Generator().manual_seed(seed))


def _rollout(model, scheduler, context, *, exit_step, draws, num_blocks=NUM_BLOCKS, **kwargs):
    return self_forcing_rollout(model, scheduler, context, num_blocks=num_blocks,
                                frames_per_block=FRAMES_PER_BLOCK, frame_shape=FRAME_SHAPE,
                                policy=FullPolicy(), exit_step=exit_step, noise_draws=draws,
                                **kwargs)


def _new_cache(model, num_blocks: int = NUM_BLOCKS) -> KVCache:
    return KVCache.for_model(model.cfg, FullPolicy(), tokens_per_frame=4,
                             horizon_frames=num_blocks * FRAMES_PER_BLOCK,
                             frames_per_block=FRAMES_PER_BLOCK, batch_size=BATCH)


def _x0(model, scheduler, x, t, context, positions, cache) -> torch.Tensor:
    """Reference loops: one denoising step reading the cache."""
    return scheduler.to_x0(model(x, t, context, frame_positions=positions, kv_cache=cache), x, t)


def _write(model, clean, context, positions, cache) -> None:
    """Reference loops: the clean write pass at t=0."""
    model(clean, torch.zeros(BATCH), context, frame_positions=positions, kv_cache=cache,
          cache_write=True)


def _param_grads(model) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------------
# The DMD gradient


def test_dmd_gradient_is_the_hand_formula_with_a_per_sample_normaliser():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [10.0, 0.0, -4.0, 2.0]]).reshape(2, 2, 1, 1, 2)
    x0_real = torch.tensor([[0.0, -1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 2, 1, 1, 2)
    x0_fake = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0]]).reshape(2, 2, 1, 1, 2)
    g = dmd_gradient(x, x0_real, x0_fake)
    # Sample 0: mean|x - x0_real| = (1 + 1 + 2 + 0) / 4 = 1; sample 1: (10 + 0 + 4 + 2) / 4 = 4.
    expected = torch.stack([(x0_fake[0] - x0_real[0]) / 1.0, (x0_fake[1] - x0_real[1]) / 4.0])
    torch.testing.assert_close(g, expected, rtol=0, atol=EXACT)
    # Per sample: rescaling sample 1's error leaves sample 0's direction unchanged.
    g_scaled = dmd_gradient(torch.cat([x[:1], 3 * x[1:]]), x0_real, x0_fake)
    torch.testing.assert_close(g_scaled[0], g[0], rtol=0, atol=0)
    assert not torch.allclose(g_scaled[1], g[1])
    # A perfect teacher match divides by the floor, not by zero.
    assert torch.isfinite(dmd_gradient(x0_real, x0_real, x0_fake)).all()


def test_generator_loss_gradient_wrt_x_is_g_over_the_element_count(scheduler):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, *FRAME_SHAPE, generator=gen).requires_grad_(True)
    noise = torch.randn(x.shape, generator=gen)
    t = torch.tensor([300.0, 700.0])
    cond, uncond = torch.tensor(0.7), torch.tensor(-0.2)
    guidance = 2.5

    def teacher(x_t, t_, context):
        return 0.8 * x_t + context

    def critic(x_t, t_, context):
        return 0.5 * x_t - 0.1

    out = dmd_generator_loss(x, teacher, critic, scheduler, t, noise, context=cond,
                             uncond_context=uncond, guidance_scale=guidance)
    out.loss.backward()
    # Hand computation: noise at t, guided teacher x0, critic x0, normalised difference.
    with torch.no_grad():
        s = (t / 1000).reshape(BATCH, 1, 1, 1, 1)
        x_t = (1 - s) * x + s * noise
        real = (0.8 * x_t + uncond) + guidance * ((0.8 * x_t + cond) - (0.8 * x_t + uncond))
        fake = 0.5 * x_t - 0.1
        normaliser = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        g = (fake - real) / normaliser
    torch.testing.assert_close(x.grad * x.numel(), g, rtol=0, atol=EXACT)
    torch.testing.assert_close(out.gradient[0], g, rtol=0, atol=EXACT)
    torch.testing.assert_close(out.loss, 0.5 * (g ** 2).mean(), rtol=0, atol=EXACT)


def test_windows_are_scored_as_separate_clips_from_position_zero(make_dit, scheduler):
    teacher, critic = make_dit(seed=3), make_dit(seed=4)
    real, fake = x0_predictor(teacher, scheduler), x0_predictor(critic, scheduler)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 6, *FRAME_SHAPE, generator=gen)
    noise = torch.randn(2, BATCH, 3, *FRAME_SHAPE, generator=gen)
    t = torch.tensor([[200.0, 500.0], [800.0, 400.0]])
    context = _text(0)
    out = dmd_generator_loss(x, real, fake, scheduler, t, noise, context=context, window_frames=3)
    for w in range(2):
        clip = x[:, 3 * w:3 * w + 3]
        x_t = scheduler.add_noise(clip, noise[w], t[w])
        with torch.no_grad():  # the model's default positions 0..2: the window as its own clip
            g = dmd_gradient(clip, real(x_t, t[w], context), fake(x_t, t[w], context))
        torch.testing.assert_close(out.gradient[w], g, rtol=0, atol=EXACT)


def test_score_windows_tile_the_rollout_and_detach_the_overlap():
    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9, 1, 1, 1).requires_grad_(True)
    windows = score_windows(x, window_frames=5, overlap_frames=1)  # frames 0-4 and 4-8
    assert windows.shape == (2, 2, 5, 1, 1, 1)
    torch.testing.assert_close(windows[1, :, 0], x[:, 4].detach())
    windows.sum().backward()
    # Frame 4 sits in both windows but takes its gradient from the first only.
    assert x.grad[:, :, 0, 0, 0].tolist() == [[1.0] * 9] * 2
    with pytest.raises(InputError, match="5 \\+ k\\*4 frames"):
        score_windows(x[:, :8], window_frames=5, overlap_frames=1)


# ---------------------------------------------------------------------------------------------
# The rollout


def test_rollout_gradient_flows_only_through_the_exit_step(make_dit, scheduler):
    """Grads from the rollout equal grads of exit-step forwards alone, on detached inputs and
    cache."""
    model, context, exit_step = make_dit(), _text(0), 3
    draws = _draws(scheduler).requires_grad_(True)
    weights = torch.randn(BATCH, NUM_BLOCKS * FRAMES_PER_BLOCK, *FRAME_SHAPE,
                          generator=torch.Generator().manual_seed(9))
    caches = []

    class SpyWriter(GeneratorWriter):
        def write(self, cache, clean_block, frame_positions, ctx, *, width_offsets=None):
            caches.append(cache)
            super().write(cache, clean_block, frame_positions, ctx, width_offsets=width_offsets)

    x = _rollout(model, scheduler, context, exit_step=exit_step, draws=draws,
                 writer=SpyWriter(model))
    (x * weights).sum().backward()
    rollout_grads = _param_grads(model)
    # The initial noise (and every re-noising draw before the exit step) is seen only by no_grad
    # steps.
    assert draws.grad is None
    assert all(
        not c.k.requires_grad and not c.v.requires_grad and c.k.grad_fn is None for c in caches
    )

    # Reference: no_grad steps by hand; the exit-step forward alone carries gradient.
    model.zero_grad()
    levels = scheduler.few_step_timesteps()
    cache, blocks = _new_cache(model), []
    for b in range(NUM_BLOCKS):
        frames = slice(3 * b, 3 * b + 3)
        positions = torch.arange(frames.start, frames.stop)
        with torch.no_grad():
            x_b = draws[0, :, frames]
            for step in range(exit_step - 1):
                t = levels[step].expand(BATCH)
                x0 = _x0(model, scheduler, x_b, t, context, positions, cache)
                x_b = scheduler.add_noise(x0, draws[step + 1, :, frames],
                                          levels[step + 1].expand(BATCH))
        t = levels[exit_step - 1].expand(BATCH)
        x0 = _x0(model, scheduler, x_b, t, context, positions, cache)
        blocks.append(x0)
        with torch.no_grad():
            _write(model, x0, context, positions, cache)
    reference = torch.cat(blocks, dim=1)
    torch.testing.assert_close(x, reference, rtol=0, atol=CLOSE)
    (reference * weights).sum().backward()
    for got, want in zip(rollout_grads, _param_grads(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=CLOSE)
    assert any(g.abs().sum() > 0 for g in rollout_grads)


def test_exit_at_the_first_step_lets_the_initial_noise_carry_gradient(make_dit, scheduler):
    """Counter-check of the test above: when step 1 is the exit step, the initial noise is on the
    path."""
    draws = _draws(scheduler).requires_grad_(True)
    _rollout(make_dit(), scheduler, _text(0), exit_step=1, draws=draws).sum().backward()
    assert draws.grad[0].abs().sum() > 0
    assert draws.grad[1:].abs().sum() == 0


def test_grad_last_frames_keeps_gradient_on_the_last_blocks_only(make_dit, scheduler):
    model = make_dit()
    x = _rollout(model, scheduler, _text(0), exit_step=2, draws=_draws(scheduler),
                 grad_last_frames=3)
    x[:, :6].sum().backward(retain_graph=True)
    assert all(g.abs().sum() == 0 for g in _param_grads(model))
    x[:, 6:].sum().backward()
    assert any(g.abs().sum() > 0 for g in _param_grads(model))


def test_rollout_without_grad_at_the_last_step_equals_a_plain_few_step_stream(make_dit, scheduler):
    model, context, draws = make_dit(), _text(0), _draws(scheduler)
    steps = len(scheduler.config.denoising_steps)
    x = _rollout(model, scheduler, context, exit_step=steps, draws=draws, grad=False)
    assert not x.requires_grad
    levels = scheduler.few_step_timesteps()
    cache, blocks = _new_cache(model), []
    with torch.no_grad():
        for b in range(NUM_BLOCKS):
            frames = slice(3 * b, 3 * b + 3)
            positions = torch.arange(frames.start, frames.stop)
            x_b = draws[0, :, frames]
            for step in range(steps):
                t = levels[step].expand(BATCH)
                x0 = _x0(model, scheduler, x_b, t, context, positions, cache)
                if step + 1 < steps:
                    x_b = scheduler.add_noise(x0, draws[step + 1, :, frames],
                                              levels[step + 1].expand(BATCH))
            _write(model, x0, context, positions, cache)
            blocks.append(x0)
    torch.testing.assert_close(x, torch.cat(blocks, dim=1), rtol=0, atol=CLOSE)


def test_rollout_noise_order_reproduces_the_streaming_generator(make_dit, scheduler):
    """``draw_rollout_noise`` consumes a generator like StreamingGenerator: same seed, same
    video."""
    model = make_dit()
    cfg = model.cfg
    preset = get_preset(
        "tiny",
        **{f"dit.{f.name}": getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
        **{
            "scheduler.shift": scheduler.config.shift,
            "video.height": FRAME_SHAPE[1],
            "video.width": FRAME_SHAPE[2],
            "video.latent_channels": FRAME_SHAPE[0],
        },
    )
    stream = StreamingGenerator(model, scheduler, preset, FullPolicy())
    stream.reset(BATCH, NUM_BLOCKS * FRAMES_PER_BLOCK)
    stream.set_prompt(_text(0))
    seed = torch.Generator().manual_seed(11)
    streamed = torch.cat([stream.generate_block(seed) for _ in range(NUM_BLOCKS)], dim=1)
    steps = len(scheduler.config.denoising_steps)
    x = _rollout(model, scheduler, _text(0), exit_step=steps, draws=_draws(scheduler, seed=11),
                 grad=False)
    torch.testing.assert_close(x, streamed, rtol=0, atol=CLOSE)


def test_rollout_rejects_bad_exit_steps_and_noise_shapes(make_dit, scheduler):
    model, draws = make_dit(), _draws(scheduler)
    with pytest.raises(InputError, match="exit_step must be in 1..4"):
        _rollout(model, scheduler, _text(0), exit_step=5, draws=draws)
    with pytest.raises(InputError, match="noise_draws must be"):
        _rollout(model, scheduler, _text(0), exit_step=2, draws=draws[:, :, :6])
    exits = {draw_exit_step(4, torch.Generator().manual_seed(s)) for s in range(40)}
    assert exits == {1, 2, 3, 4}


# ---------------------------------------------------------------------------------------------
# Critic and update schedule


def test_critic_loss_is_flow_matching_on_detached_student_windows(make_dit, scheduler):
    critic, context = make_dit(seed=5), _text(0)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, 6, *FRAME_SHAPE, generator=gen).requires_grad_(True)
    noise = torch.randn(2, BATCH, 3, *FRAME_SHAPE, generator=gen)
    t = torch.tensor([100.0, 900.0])
    out = critic_flow_matching_loss(critic, scheduler, x, context, t, noise, window_frames=3)
    per_window = [teacher_flow_matching_loss(critic, scheduler, x[:, 3 * w:3 * w + 3].detach(),
                                             context, noise[w], t).loss for w in range(2)]
    torch.testing.assert_close(out.loss, torch.stack(per_window).mean(), rtol=0, atol=EXACT)
    assert out.per_element.shape == x.shape
    out.loss.backward()
    assert x.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


def test_update_schedule_trains_the_generator_once_per_five_critic_steps():
    schedule = DMDUpdateSchedule.from_config(DMDStepConfig())
    steps = range(20)
    generator_steps = [k for k in steps if schedule.generator_updates(k)]
    assert generator_steps == [0, 5, 10, 15]
    assert all(schedule.critic_updates(k) for k in steps)
    assert sum(DMDUpdateSchedule(1).generator_updates(k) for k in steps) == 20
    with pytest.raises(ConfigError):
        DMDUpdateSchedule(0)


def test_step_config_takes_its_timestep_clamp_from_the_scheduler(scheduler):
    config = DMDStepConfig.for_scheduler(SchedulerConfig(min_timestep=100.0, max_timestep=600.0))
    t = config.draw_timesteps(scheduler, 4096, torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.min() == 100.0 and t.max() == 600.0
    assert DMDStepConfig().min_timestep == SchedulerConfig().min_timestep
    with pytest.raises(ConfigError, match="history_mode"):
        DMDStepConfig(history_mode="sometimes").validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# History loss and the λ mix


def test_history_rollout_uses_the_empty_text_after_the_first_chunk(make_dit, scheduler):
    model, context, draws = make_dit(), _text(0), _draws(scheduler)
    empty = torch.zeros(BATCH, TEXT_TOKENS, TEXT_DIM)
    contexts = history_block_contexts(context, empty, frames_per_block=FRAMES_PER_BLOCK,
                                      first_chunk_frames=3)
    assert [contexts(b) is empty for b in range(NUM_BLOCKS)] == [False, True, True]
    real = _rollout(model, scheduler, context, exit_step=2, draws=draws, grad=False)
    history = _rollout(model, scheduler, context, exit_step=2, draws=draws, grad=False,
                       context_per_block=contexts)
    torch.testing.assert_close(history[:, :3], real[:, :3], rtol=0, atol=0)
    assert (history[:, 3:] - real[:, 3:]).abs().amax() > 1e-3
    # The same later chunks come out of a rollout whose every block is prompted explicitly.
    listed = _rollout(model, scheduler, context, exit_step=2, draws=draws, grad=False,
                      context_per_block=[context, empty, empty])
    torch.testing.assert_close(listed, history, rtol=0, atol=0)


def test_history_loss_scores_later_chunks_with_the_real_text(scheduler):
    context, empty, uncond = torch.tensor(1.0), torch.tensor(0.0), torch.tensor(-1.0)
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(BATCH, 9, *FRAME_SHAPE, generator=gen).requires_grad_(True)
    noise = torch.randn(2, BATCH, 3, *FRAME_SHAPE, generator=gen)
    t = torch.tensor([250.0, 750.0])
    seen_prompts, scored = [], []

    def rollout(contexts):
        seen_prompts.extend(contexts(b) for b in range(3))
        return sample

    def teacher(x_t, t_, ctx):
        scored.append(ctx)
        return 0.5 * x_t + ctx

    def critic(x_t, t_, ctx):
        scored.append(ctx)
        return 0.25 * x_t

    out = history_loss(rollout, teacher, critic, scheduler, t, noise, context=context,
                       empty_context=empty,
                       uncond_context=uncond, guidance_scale=3.0, frames_per_block=FRAMES_PER_BLOCK,
                       window_frames=3)
    assert seen_prompts == [context, empty, empty]
    assert all(ctx is context or ctx is uncond for ctx in scored) and any(
        ctx is uncond for ctx in scored
    )
    out.loss.backward()
    # the first chunk is the DMD loss's, not the history loss's
    assert sample.grad[:, :3].abs().sum() == 0
    plain = dmd_generator_loss(sample.detach()[:, 3:], teacher, critic, scheduler, t, noise,
                               context=context,
                               uncond_context=uncond, guidance_scale=3.0, window_frames=3)
    torch.testing.assert_close(out.gradient, plain.gradient, rtol=0, atol=EXACT)
    with pytest.raises(InputError, match="chunks after the first"):
        history_loss(lambda c: sample[:, :3], teacher, critic, scheduler, t, noise[:1],
                     context=context,
                     empty_context=empty, frames_per_block=FRAMES_PER_BLOCK, window_frames=3)


def test_lambda_as_weight_is_exact_and_as_probability_follows_the_draw():
    lam = 0.8
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(5.0, requires_grad=True)
    weighted = combine(a * 3, b * 7, lam, "weight")
    weighted.backward()
    assert weighted.item() == pytest.approx((1 - lam) * 6 + lam * 35)
    assert a.grad.item() == pytest.approx((1 - lam) * 3) and b.grad.item() == pytest.approx(lam * 7)
    assert combine(a, None, lam, "probability", use_history=False) is a
    assert combine(None, b, lam, "probability", use_history=True) is b
    gen = torch.Generator().manual_seed(0)
    draws = [draw_history_choice(lam, gen) for _ in range(4000)]
    values = [combine(torch.tensor(6.0), torch.tensor(35.0), lam, "probability",
                      use_history=d).item()
              for d in draws]
    assert values == [35.0 if d else 6.0 for d in draws]
    # In expectation the probability mode is the weighted loss (3 standard errors).
    stderr = (35.0 - 6.0) * (lam * (1 - lam) / len(draws)) ** 0.5
    assert abs(sum(values) / len(values) - ((1 - lam) * 6 + lam * 35)) < 3 * stderr
    with pytest.raises(InputError, match="needs both"):
        combine(a, None, lam, "weight")
    with pytest.raises(InputError, match="needs use_history"):
        combine(a, b, lam, "probability")
