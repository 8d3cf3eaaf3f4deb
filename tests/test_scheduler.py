import pytest
import torch

from mag.config import SchedulerConfig
from mag.errors import ConfigError
from mag.schedulers import FlowMatchScheduler, shift_sigma


def test_few_step_list_warps_like_self_forcing_at_shift_5():
    sched = FlowMatchScheduler(SchedulerConfig(shift=5.0, denoising_steps=(1000, 750, 500, 250)))
    expected = torch.tensor([1000.0, 937.5, 833.333, 625.0])
    torch.testing.assert_close(sched.few_step_timesteps(), expected, atol=1e-3, rtol=0)


def test_shift_one_is_identity_and_shift_is_monotone():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    warped = shift_sigma(s, 3.0)
    assert torch.all(warped[1:] > warped[:-1])
    assert warped[0] == 0 and warped[-1] == 1


def test_add_noise_and_conversions_are_consistent_per_frame():
    sched = FlowMatchScheduler(SchedulerConfig(shift=5.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 6, 3, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([[100.0, 200, 300, 400, 500, 600], [900.0, 800, 700, 600, 500, 400]])
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[1, 0], 0.1 * x0[1, 0] + 0.9 * eps[1, 0])
    v = sched.velocity_target(x0, eps)
    torch.testing.assert_close(sched.velocity_to_x0(v, x_t, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(sched.x0_to_velocity(x0, x_t, t), v, atol=1e-4, rtol=0)
    x0_sched = FlowMatchScheduler(SchedulerConfig(), prediction="x0")
    torch.testing.assert_close(x0_sched.to_velocity(x0, x_t, t), v, atol=1e-4, rtol=0)
    torch.testing.assert_close(sched.to_x0(v, x_t, t), x0, atol=1e-5, rtol=0)


def test_euler_step_with_exact_velocity_lands_on_the_path():
    sched = FlowMatchScheduler(SchedulerConfig())
    x0, eps = torch.randn(1, 3, 3, 2, 2), torch.randn(1, 3, 3, 2, 2)
    t, t_next = torch.tensor([800.0]), torch.tensor([300.0])
    x_next = sched.step_euler(sched.velocity_target(x0, eps), sched.add_noise(x0, eps, t), t,
                              t_next)
    torch.testing.assert_close(x_next, sched.add_noise(x0, eps, t_next), atol=1e-5, rtol=0)


def test_dmd_timesteps_are_clamped():
    sched = FlowMatchScheduler(SchedulerConfig(shift=5.0))
    t = sched.sample_dmd_timesteps((10_000,), generator=torch.Generator().manual_seed(1))
    assert t.min() >= 20.0 and t.max() <= 980.0
    assert (t == 980.0).any(), "shift 5 pushes mass to high noise, so the upper clamp must be hit"


def test_sampling_timesteps_start_at_full_noise():
    sched = FlowMatchScheduler(SchedulerConfig(shift=3.0))
    ts = sched.sampling_timesteps(8)
    assert ts.shape == (8,) and ts[0] == 1000.0 and torch.all(ts[1:] < ts[:-1]) and ts[-1] > 0


@pytest.mark.parametrize("bad", [dict(shift=0.0), dict(denoising_steps=(250, 500)),
                                 dict(denoising_steps=())])
def test_bad_scheduler_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        FlowMatchScheduler(SchedulerConfig(**bad))
