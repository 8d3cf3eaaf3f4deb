"""The training chain in the trainer: teacher, causal init (ODE regression, causal FM), Self-Forcing
DMD.

Pins: every shipped chain recipe parses and runs 2 steps on a tiny override; ODE pairs round-trip
and the teacher's Euler ODE is the exact solution on a model with a known answer; the ODE loss takes
each block at its drawn level; ``init.model`` really loads; DMD updates the critic every step and
the generator every n-th; DMD kill-and-resume is bitwise; resume refuses a changed dmd field; a
missing teacher is one CLI line; a camera-anchored rollout passes camera positions to every model
call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    CAMERA,
    TINY_OVERRIDES,
    assert_dmd_resume_is_bitwise,
    recipe_dict,
    trained_model_file,
)

from mag.cache import FullPolicy
from mag.checkpoint import latest_checkpoint, load_checkpoint
from mag.config import SchedulerConfig
from mag.errors import CheckpointError, ConfigError, InputError
from mag.objectives.ode import (
    ODEPairs,
    few_step_indices,
    load_ode_pairs,
    ode_regression_loss,
    sample_ode_trajectory,
    save_ode_pairs,
)
from mag.pipelines.rollout import draw_rollout_noise, self_forcing_rollout
from mag.registry import load_model
from mag.schedulers import FlowMatchScheduler
from mag.train.recipe import Recipe, load_recipe, recipe_differences, recipe_from_dict
from mag.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CHAIN_RECIPES = ("tiny-teacher.toml", "tiny-ode-init.toml", "tiny-dmd.toml")
# 2 blocks of 3 frames scored in 2 teacher windows of 3 frames; the generator updates every 2nd
# step.
DMD = {"critic_steps_per_generator_step": 2, "rollout_blocks": 2, "teacher_frames": 3,
       "critic_lr": 2e-3}
# Euler steps of the test pairs: the tiny preset's levels 1000/750/500/250 land on them
ODE_STEPS = 4
EXACT = 1e-5


def _recipe(kind: str, **kwargs) -> Recipe:
    return recipe_from_dict(recipe_dict(kind, **kwargs))


def _teacher(root: Path, overrides: dict | None = None) -> Path:
    return trained_model_file(root, "teacher_fm", "teacher", "teacher", overrides)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def camera_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _teacher(tmp_path_factory.mktemp("camera_teacher"), CAMERA)


def _pairs(teacher: Path, folder: Path) -> Path:
    from mag.cli import main

    out = folder / "pairs.safetensors"
    assert main(["train", "ode-pairs", "--teacher", str(teacher), "--out", str(out), "--clips", "3",
                 "--steps", str(ODE_STEPS), "--batch", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def pairs_file(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pairs(teacher, tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def camera_pairs_file(camera_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pairs(camera_teacher, tmp_path_factory.mktemp("camera_pairs"))


def _dmd(teacher: Path, **changes) -> Recipe:
    return _recipe("dmd", dmd={"teacher": str(teacher), **DMD, **changes.pop("dmd", {})}, **changes)


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", CHAIN_RECIPES)
def test_chain_recipe_parses_and_runs_two_steps_on_a_tiny_override(name, camera_teacher,
                                                                   camera_pairs_file,
                                                                  tmp_path):
    """The shipped chain is camera-anchored (like the recall model), so its stand-ins are too."""
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.build_preset().dit.camera_rope
    teacher, pairs_file = camera_teacher, camera_pairs_file
    data = recipe.to_dict()
    data.update(preset_overrides={**data["preset_overrides"], **TINY_OVERRIDES},
                loop={**data["loop"], "steps": 2, "batch_size": 1, "log_every": 1, "ckpt_every": 2})
    if recipe.objective.kind == "ode":
        data["ode"] = {"pairs": str(pairs_file)}
        data["init"] = {"model": str(teacher)}
        data["data"] = {**data["data"], "clip_frames": 6}
    if recipe.objective.kind == "dmd":
        blocks = data["dmd"]["teacher_frames"] // 3
        data["dmd"] = {**data["dmd"], "teacher": str(teacher), "critic": "",
                       "rollout_blocks": blocks}
        data["init"] = {"model": str(teacher)}
    result = Trainer(recipe_from_dict(data), tmp_path, progress=False).run()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_recipe_validation_names_the_field():
    with pytest.raises(ConfigError, match="dmd.teacher"):
        _recipe("dmd")
    with pytest.raises(ConfigError, match="ode.pairs"):
        _recipe("ode")
    # 3 blocks = 9 frames, windows of 6
    with pytest.raises(ConfigError, match="dmd.rollout_blocks"):
        _recipe("dmd", dmd={"teacher": "t", "rollout_blocks": 3, "teacher_frames": 6},
                data={"clip_frames": 9})
    with pytest.raises(ConfigError, match="multiple of the block size"):
        _recipe("dmd", dmd={"teacher": "t", "rollout_blocks": 2, "teacher_frames": 4})
    with pytest.raises(ConfigError, match="data.clip_frames"):
        _recipe("dmd", dmd={"teacher": "t", "rollout_blocks": 3, "teacher_frames": 3})
    with pytest.raises(ConfigError, match="dmd.critic_lr"):
        _recipe("dmd", dmd={"teacher": "t", "critic_lr": 0.0})
    # history scores windows after the first
    with pytest.raises(ConfigError, match="history_lambda"):
        _recipe("dmd", dmd={"teacher": "t", "rollout_blocks": 2, "teacher_frames": 6,
                            "history_lambda": 0.5})


def test_a_checkpoint_recipe_from_before_the_new_sections_still_resumes():
    current = _recipe("causal_fm")
    stored = current.to_dict()
    for section in ("init", "ode", "dmd"):
        del stored[section]
    assert recipe_differences(stored, current) == []
    changed = recipe_from_dict({**recipe_dict("causal_fm"), "init": {"model": "x.safetensors"}})
    assert recipe_differences(stored, changed) == ["init.model: checkpoint '' vs now "
                                                   "'x.safetensors'"]


# ------------------------------------------------------------------------------ ODE pairs
class _ConstantX0(torch.nn.Module):
    """Predicts x0 = the context's first number everywhere: the guided ODE then has a closed
    form."""

    def forward(self, x, t, context, width_offsets=None):
        return context[:, :1, :1, None, None].expand_as(x)


def test_euler_ode_matches_the_closed_form_with_guidance():
    # x0-prediction c makes dx/ds = (x - c)/s, solved by x(s) = c + s (eps - c), which Euler follows
    # exactly; guidance x0_u + w (x0_c - x0_u) is the same ODE with c = u + w (c - u).
    scheduler = FlowMatchScheduler(SchedulerConfig(shift=3.0), "x0")
    noise = torch.randn(2, 6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond, guidance = torch.full((2, 1, 1), 0.5), torch.full((2, 1, 1), -0.25), 3.0
    trajectory, x0 = sample_ode_trajectory(_ConstantX0(), scheduler, noise, cond, uncond, 8,
                                           guidance_scale=guidance)
    c = -0.25 + guidance * 0.75
    sigma = scheduler.few_step_timesteps() / 1000
    assert trajectory.shape == (2, 4, 6, 3, 4, 4)
    for k, s in enumerate(sigma):
        torch.testing.assert_close(trajectory[:, k], c + s * (noise - c), rtol=0, atol=EXACT)
    torch.testing.assert_close(x0, torch.full_like(x0, c), rtol=0, atol=EXACT)
    assert few_step_indices(scheduler, 8) == [0, 2, 4, 6]
    with pytest.raises(InputError, match="e.g. 4"):
        few_step_indices(scheduler, 6)


def test_ode_pairs_file_round_trip_and_cli(pairs_file, teacher, tmp_path, capsys):
    from mag.cli import main

    pairs = load_ode_pairs(pairs_file)
    assert pairs.trajectory.shape == (3, 4, 6, 3, 16, 16) and pairs.x0.shape == (3, 6, 3, 16, 16)
    assert pairs.context.shape[0] == 3 and pairs.offsets.shape == (3, 6) and pairs.camera_px is None
    assert len(pairs.metadata["prompts"]) == 3 and pairs.metadata["steps"] == ODE_STEPS
    _, preset, _ = load_model(teacher)
    torch.testing.assert_close(pairs.timesteps,
                               FlowMatchScheduler(preset.scheduler).few_step_timesteps())
    # The first level is t = 1000: the trajectory starts at the clip's initial noise.
    from mag.train.steps import sample_generator

    first_noise = torch.randn((6, 3, 16, 16), generator=sample_generator(0, 0, 0, 0))
    assert torch.equal(pairs.trajectory[0, 0], first_noise)
    # Save + load is exact, and writes no temporary file.
    again = save_ode_pairs(tmp_path / "copy.safetensors", pairs)
    loaded = load_ode_pairs(again)
    for name in ("trajectory", "x0", "context", "timesteps", "offsets"):
        assert torch.equal(getattr(loaded, name), getattr(pairs, name)), name
    assert loaded.metadata == pairs.metadata and not list(tmp_path.glob("*.tmp"))
    # Errors: steps off the few-step grid, a foreign file, a missing file -- one line, exit 2.
    capsys.readouterr()
    assert main(["train", "ode-pairs", "--teacher", str(teacher), "--out",
                 str(tmp_path / "x.safetensors"),
                 "--clips", "1", "--steps", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "do not land on the few-step levels" in err and err.count("\n") == 1
    with pytest.raises(CheckpointError, match="not an ODE pairs file"):
        load_ode_pairs(teacher)
    with pytest.raises(CheckpointError, match="not found"):
        load_ode_pairs(tmp_path / "missing.safetensors")


class _EchoNoisy(torch.nn.Module):
    """An x0 'predictor' that returns its input: the ODE loss is then |x_t - x0|^2 at the drawn
    level."""

    def forward(self, x, t, context, frame_positions=None, frame_mask=None, width_offsets=None):
        return x


def test_ode_loss_takes_each_block_at_its_drawn_level():
    scheduler = FlowMatchScheduler(SchedulerConfig(shift=3.0), "x0")
    batch, levels, frames = 2, 4, 6
    trajectory = torch.arange(1.0, levels + 1)[None, :, None, None, None, None].expand(
        batch, levels, frames, 3, 4, 4).clone()
    x0 = torch.zeros(batch, frames, 3, 4, 4)
    level_index = torch.tensor([[0, 3], [2, 1]])
    context = torch.zeros(batch, 1, 8)
    out = ode_regression_loss(_EchoNoisy(), scheduler, trajectory, x0, context, 3, level_index)
    per_block = out.per_element.reshape(batch, 2, -1)
    expected = (level_index.float() + 1) ** 2
    assert torch.equal(per_block.amin(-1), expected) and torch.equal(per_block.amax(-1), expected)
    with pytest.raises(InputError, match="one level per block"):
        ode_regression_loss(_EchoNoisy(), scheduler, trajectory, x0, torch.zeros(batch, 1, 8), 3,
                            torch.zeros(batch, 6, dtype=torch.long))


def test_ode_stage_refuses_pairs_from_another_schedule(pairs_file, tmp_path):
    recipe = _recipe("ode", ode={"pairs": str(pairs_file)}, overrides={"scheduler.shift": 5.0})
    with pytest.raises(ConfigError, match="regenerate the pairs"):
        Trainer(recipe, tmp_path, progress=False)


# ------------------------------------------------------------------------------ init.model
def test_init_model_loads_its_weights(teacher, tmp_path):
    source, _, _ = load_model(teacher)
    trainer = Trainer(_recipe("causal_fm", init={"model": str(teacher)}), tmp_path / "a",
                      progress=False)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), source.state_dict()[name]), name
    for name, value in trainer.ema.state_dict().items():  # the EMA starts from the loaded weights
        assert torch.equal(value, source.state_dict()[name]), f"ema {name}"
    random = Trainer(_recipe("causal_fm"), tmp_path / "b", progress=False)
    assert any(not torch.equal(p, source.state_dict()[n]) for n,
               p in random.model.named_parameters())
    with pytest.raises(CheckpointError, match="different network"):
        Trainer(_recipe("causal_fm", init={"model": str(teacher)}, overrides={"dit.num_layers": 1}),
                tmp_path / "c", progress=False)


# ------------------------------------------------------------------------------ DMD
def _adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    return {float(state["step"]) for state in optimizer.state.values()}


def test_dmd_updates_the_critic_every_step_and_the_generator_every_nth(teacher, tmp_path):
    trainer = Trainer(_dmd(teacher, steps=4), tmp_path, progress=False)
    generator_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.dmd.teacher.state_dict().items()}
    trainer.run()
    assert _adam_steps(trainer.dmd.critic_optimizer) == {4.0}   # every step
    assert _adam_steps(trainer.optimizer) == {2.0}              # steps 0 and 2 of 4 (every 2nd)
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.count('"generator_updated": 1.0') for r in records] == [1, 0, 1, 0]
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k,
               v in generator_before.items())
    assert all(torch.equal(v, trainer.dmd.teacher.state_dict()[k]) for k,
               v in teacher_before.items())
    assert not any(p.requires_grad for p in trainer.dmd.teacher.parameters())
    # The critic started as a copy of the teacher and has moved away from it.
    assert any(not torch.equal(v, trainer.dmd.critic.state_dict()[k]) for k,
               v in teacher_before.items())


def test_dmd_kill_and_resume_is_bitwise_identical(teacher, tmp_path):
    recipe = _dmd(teacher, steps=4, loop={"ckpt_every": 1})
    assert_dmd_resume_is_bitwise(recipe, tmp_path, stop_at=3)  # stops between two generator updates
    saved = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert (
        any(k.startswith("critic.model.") for k in saved.extra)
        and "critic_optimizer" in saved.metadata
    )


def test_window_by_window_dmd_loss_is_the_windowed_dmd_generator_loss(teacher, tmp_path):
    from mag.objectives.dmd import dmd_generator_loss, x0_predictor
    from mag.train.steps.dmd import _Clips

    trainer = Trainer(_dmd(teacher, dmd={"guidance_scale": 2.5}), tmp_path, progress=False)
    stage, gen = trainer.dmd, torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 16, 16, generator=gen, requires_grad=True)
    t, noise = torch.tensor([[300.0, 700.0], [500.0, 900.0]]), torch.randn(2, 2, 3, 3, 16, 16,
                                                                           generator=gen)
    context = torch.randn(2, 1, 384, generator=gen)
    clips = _Clips(context, trainer.empty_context.expand_as(context), None)
    ours, _ = stage._dmd_loss(*stage._windows(x, None), t, noise, clips)
    (grad_ours,) = torch.autograd.grad(ours, x)
    reference = dmd_generator_loss(x, x0_predictor(stage.teacher, trainer.scheduler),
                                   x0_predictor(stage.critic, trainer.scheduler), trainer.scheduler,
                                   t, noise,
                                   context=context, uncond_context=clips.uncond, guidance_scale=2.5,
                                   window_frames=3).loss
    (grad_reference,) = torch.autograd.grad(reference, x)
    assert ours > 0
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-6, atol=1e-12)


def test_resume_with_a_changed_dmd_field_is_refused(teacher, tmp_path):
    Trainer(_dmd(teacher, steps=2), tmp_path, progress=False).run()
    with pytest.raises(CheckpointError, match="dmd.guidance_scale"):
        Trainer(_dmd(teacher, steps=4, dmd={"guidance_scale": 2.0}), tmp_path, resume=True,
                progress=False)


def test_a_missing_teacher_is_a_checkpoint_error_and_one_cli_line(tmp_path, capsys):
    from mag.cli import main

    missing = tmp_path / "no-teacher.safetensors"
    with pytest.raises(CheckpointError, match="no-teacher"):
        Trainer(_dmd(missing), tmp_path / "run", progress=False)
    recipe = tmp_path / "dmd.toml"
    lines = ['name = "dmd"\npreset = "tiny"\n[preset_overrides]\n',
             *(f'"{k}" = {v}\n' for k, v in TINY_OVERRIDES.items()),
             '[objective]\nkind = "dmd"\n[data]\nclip_frames = 6\n',
             f'[dmd]\nteacher = "{missing}"\nrollout_blocks = 2\nteacher_frames = 3\n']
    recipe.write_text("".join(lines))
    capsys.readouterr()
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "cli"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mag: error:") and "no-teacher" in err and err.count("\n") == 1


def test_dmd_with_the_history_loss_runs(teacher, tmp_path):
    for mode in ("weight", "probability"):
        recipe = _dmd(teacher, steps=1, dmd={"history_lambda": 0.5, "history_mode": mode})
        Trainer(recipe, tmp_path / mode, progress=False).run()
        assert '"generator_updated": 1.0' in (tmp_path / mode / "metrics.jsonl").read_text()


def test_camera_anchored_dmd_runs(camera_teacher, tmp_path):
    recipe = _dmd(camera_teacher, steps=2, overrides=CAMERA, init={"model": str(camera_teacher)})
    Trainer(recipe, tmp_path, progress=False).run()
    assert _adam_steps(Trainer(recipe, tmp_path, resume=True, progress=False).optimizer) == {1.0}


def test_camera_rollout_gives_every_call_the_frames_positions(make_dit):
    """RoPE is relative: shifting every frame's camera position alike (the write pass included)
    leaves the rollout unchanged, while another track changes it; a missing offset anywhere would
    raise."""
    model = make_dit(camera_rope=True)
    scheduler = FlowMatchScheduler(SchedulerConfig(shift=3.0), "velocity")
    draws = draw_rollout_noise(1, 2, 3, (4, 4, 4), 4, torch.Generator().manual_seed(0))
    context = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    track = torch.tensor([[0.0, 1, 2, 2, 1, 0]])

    def rollout(offsets):
        with torch.no_grad():
            return self_forcing_rollout(model, scheduler, context, num_blocks=2, frames_per_block=3,
                                        frame_shape=(4, 4, 4), policy=FullPolicy(), exit_step=3,
                                        noise_draws=draws, width_offsets=offsets)

    base = rollout(track)
    torch.testing.assert_close(rollout(track + 5), base, rtol=0, atol=1e-4)
    assert (rollout(torch.zeros_like(track)) - base).abs().max() > 1e-3
    with pytest.raises(InputError, match="width_offsets must be"):
        rollout(track[:, :3])


def test_ode_pairs_of_a_camera_teacher_carry_camera_tracks(camera_teacher, tmp_path):
    from mag.train.ode_pairs import make_ode_pairs

    pairs = make_ode_pairs(str(camera_teacher), 2, num_steps=ODE_STEPS, guidance_scale=1.0,
                           progress=False)
    assert pairs.camera_px is not None and pairs.camera_px.shape == (2, 6)
    path = save_ode_pairs(tmp_path / "p.safetensors", pairs)
    recipe = _recipe("ode", ode={"pairs": str(path)}, overrides=CAMERA)
    assert Trainer(recipe, tmp_path / "run", progress=False).run().step == 2
    assert isinstance(load_ode_pairs(path), ODEPairs)
