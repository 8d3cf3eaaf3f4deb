"""DMD with a block-causal teacher (``dmd.score_mode = "teacher_forced"``).

Pins: the score is the teacher-forced pass (each noisy block given the window's clean blocks before
it) and respects causality (a clean block changes the scores of later blocks only); the DMD step
uses it for teacher and critic, trains the critic with causal flow matching, and runs two steps on
a tiny override with a causal teacher; an unknown mode is one ConfigError.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CAMERA, random_dit, recipe_dict, trained_model_file

from mag.config import get_preset
from mag.errors import ConfigError
from mag.objectives.flow_matching import (
    clean_noisy_forward,
    teacher_forced_x0_score,
    teacher_forcing_mask,
)
from mag.schedulers import FlowMatchScheduler
from mag.train.recipe import Recipe, recipe_from_dict
from mag.train.trainer import Trainer

F = 3
BLOCKS = 3
TEXT_TOKENS = 4
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "dit.freq_dim": 16, "video.height": 16, "video.width": 16}
DMD = {"critic_steps_per_generator_step": 2, "rollout_blocks": 3, "teacher_frames": 9,
       "critic_lr": 2e-3, "guidance_scale": 1.5}


@pytest.fixture(scope="module")
def causal_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model_file(tmp_path_factory.mktemp("teacher"), "causal_fm", "causal-teacher",
                              "causal", CAMERA)


def _setup():
    preset = get_preset("tiny", **SMALL)
    model = random_dit(preset.dit, seed=0)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    gen = torch.Generator().manual_seed(1)
    shape = (2, BLOCKS * F, preset.dit.in_channels, preset.video.latent_height,
             preset.video.latent_width)
    clean, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    context = torch.randn(2, TEXT_TOKENS, preset.dit.text_dim, generator=gen)
    t = torch.tensor([400.0, 800.0])
    return model, scheduler, clean, scheduler.add_noise(clean, noise, t), context, t


def test_the_score_is_the_teacher_forced_pass_and_is_causal():
    model, scheduler, clean, x_t, context, t = _setup()
    score = teacher_forced_x0_score(model, scheduler, clean, F)
    with torch.no_grad():
        got = score(x_t, t, context)
        t_frame = t[:, None].expand(clean.shape[:2])
        expected = scheduler.to_x0(
            clean_noisy_forward(model, clean, x_t, t_frame, context,
                                teacher_forcing_mask(BLOCKS * F, F)), x_t, t)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # Block 1's clean frames reach the score of block 2 only (block 1 itself sees its noisy
        # frames and the clean block 0).
        changed = clean.clone()
        changed[:, F:2 * F] += 1.0
        other = teacher_forced_x0_score(model, scheduler, changed, F)(x_t, t, context)
    torch.testing.assert_close(other[:, :2 * F], got[:, :2 * F], rtol=0, atol=1e-6)
    assert not torch.allclose(other[:, 2 * F:], got[:, 2 * F:])


def _recipe(teacher: Path, mode: str) -> Recipe:
    return recipe_from_dict(recipe_dict(
        "dmd", overrides=CAMERA, data={"clip_frames": 9},
        dmd={"teacher": str(teacher), **DMD, "score_mode": mode}))


def test_dmd_with_a_causal_teacher_runs_and_scores_differently(causal_teacher, tmp_path):
    losses = {}
    for mode in ("teacher_forced", "bidirectional"):
        trainer = Trainer(_recipe(causal_teacher, mode), tmp_path / mode, progress=False)
        stage = trainer.dmd
        # Random weights everywhere (Wan's init zeroes the head), teacher and critic apart.
        with torch.no_grad():
            for seed, model in enumerate((trainer.model, stage.teacher, stage.critic)):
                model.load_state_dict(random_dit(trainer.preset.dit, seed=seed + 1).state_dict())
        losses[mode] = (stage._generator_loss(0, 0, range(1))[0].detach(),
                        stage._critic_loss(0, 0, range(1)).detach())
    for index in (0, 1):  # generator (DMD) and critic (flow matching) losses
        assert torch.isfinite(losses["teacher_forced"][index])
        assert not torch.allclose(losses["teacher_forced"][index],
                                  losses["bidirectional"][index], rtol=1e-3, atol=0)
    result = Trainer(_recipe(causal_teacher, "teacher_forced"), tmp_path / "run",
                     progress=False).run()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_an_unknown_score_mode_is_one_config_error(causal_teacher):
    with pytest.raises(ConfigError, match="dmd.score_mode must be one of"):
        _recipe(causal_teacher, "causal")
