"""MAG stage 2 in the trainer: DMD whose rollouts read a cache written by the frozen memory model.

Pins: the three shipped stage-2 recipes parse and run 2 steps on a tiny override; a ``mag``
rollout's generator loss has a nonzero generator gradient and none for the frozen memory model; the
cache really is the memory model's (changing its weights, or writing with the generator instead,
changes the loss of the same generator); λ > 0 changes the loss and its gradient;
``grad_last_frames`` scores only windows with gradient and leaves the draws alone; bad combinations
are one clear ConfigError / CheckpointError; the memory model is recorded in checkpoints, a
different one is refused on resume, and kill-and-resume of a ``mag`` run with the history loss is
bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    CAMERA,
    TINY_OVERRIDES,
    assert_dmd_resume_is_bitwise,
    memory_model_file,
    random_dit,
    recipe_dict,
    trained_model_file,
)
from safetensors import safe_open
from safetensors.torch import save_file

from mag.cache import DownsamplePolicy, FullPolicy, MagPolicy
from mag.checkpoint import latest_checkpoint, load_checkpoint
from mag.errors import CheckpointError, ConfigError
from mag.train.recipe import Recipe, load_recipe, recipe_from_dict
from mag.train.steps import MEMORY_MODEL_METADATA, ROLE_GENERATOR
from mag.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
MAG_RECIPES = ("tiny-mag.toml", "tiny-mag-lambda0.toml", "tiny-mag-no-stage1.toml")
# 3 blocks of 3 frames scored in 3 teacher windows of 3 frames; the generator updates every 2nd
# step.
ROLLOUT_BLOCKS = 3
CLIP_FRAMES = 9
DMD = {"critic_steps_per_generator_step": 2, "rollout_blocks": ROLLOUT_BLOCKS, "teacher_frames": 3,
       "critic_lr": 2e-3}
# Scale of the random perturbation of the memory model's weights.
PERTURBATION = 0.3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A camera-anchored teacher file (2 flow-matching steps)."""
    return trained_model_file(tmp_path_factory.mktemp("teacher"), "teacher_fm", "teacher",
                              "teacher", CAMERA)


@pytest.fixture(scope="module")
def memory(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A camera-anchored memory-model file (2 memory steps, initialised from the teacher's
    weights)."""
    return memory_model_file(tmp_path_factory.mktemp("memory"), teacher)


def _mag(teacher: Path, memory: Path | None, **changes) -> Recipe:
    dmd = {"teacher": str(teacher), **DMD, "rollout_policy": "mag" if memory else "full",
           "memory_model": str(memory) if memory else "", **changes.pop("dmd", {})}
    data = {"clip_frames": CLIP_FRAMES, **changes.pop("data", {})}
    return recipe_from_dict(recipe_dict("dmd", overrides={**CAMERA, **changes.pop("overrides", {})},
                                        dmd=dmd, data=data, **changes))


def _trainer(recipe: Recipe, root: Path) -> Trainer:
    """A trainer whose generator has random weights everywhere (Wan's init zeroes the head, which
    would make the generator's output independent of its cache)."""
    trainer = Trainer(recipe, root, progress=False)
    with torch.no_grad():
        trainer.model.load_state_dict(random_dit(recipe.build_preset().dit, seed=1).state_dict())
    return trainer


def _generator_loss(trainer: Trainer) -> torch.Tensor:
    return trainer.dmd._generator_loss(0, 0, range(2))[0]


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", MAG_RECIPES)
def test_mag_recipe_parses_and_runs_two_steps_on_a_tiny_override(name, teacher, memory, tmp_path):
    recipe = load_recipe(REPO / "recipes" / name)
    dmd = recipe.dmd
    assert recipe.objective.kind == "dmd" and recipe.preset_overrides["dit.camera_rope"] is True
    assert recipe.init.model == "models/tiny-dmd.safetensors"
    assert dmd.teacher == "models/tiny-teacher.safetensors"
    # Early blocks leave the window policy's frames: only the memory can bring them back.
    cache = recipe.build_preset().cache
    assert dmd.rollout_blocks * cache.frames_per_block > cache.sink_frames + cache.window_frames
    expected = {"tiny-mag.toml": ("mag", True), "tiny-mag-lambda0.toml": ("mag", False),
                "tiny-mag-no-stage1.toml": ("downsample", True)}[name]
    assert (dmd.rollout_policy, dmd.history_lambda > 0) == expected
    assert bool(dmd.memory_model) == (dmd.rollout_policy == "mag")
    data = recipe.to_dict()
    data.update(preset_overrides={**data["preset_overrides"], **TINY_OVERRIDES},
                loop={**data["loop"], "steps": 2, "batch_size": 1, "log_every": 1, "ckpt_every": 2},
                init={"model": str(teacher)})
    data["dmd"] = {**data["dmd"], "teacher": str(teacher),
                   **({"memory_model": str(memory)} if dmd.memory_model else {})}
    result = Trainer(recipe_from_dict(data), tmp_path, progress=False).run()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))


# ------------------------------------------------------------------------------ the mag rollout
def test_mag_generator_step_has_a_generator_gradient_and_a_frozen_memory_model(teacher, memory,
                                                                               tmp_path):
    trainer = _trainer(_mag(teacher, memory), tmp_path)
    stage = trainer.dmd
    assert isinstance(stage.policy, MagPolicy) and stage.writer.model is stage.memory_model
    assert not any(p.requires_grad for p in stage.memory_model.parameters())
    _generator_loss(trainer).backward()
    grads = [p.grad for p in trainer.model.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in stage.memory_model.parameters())


def test_the_rollout_cache_is_written_by_the_memory_model(teacher, memory, tmp_path):
    """Same generator, same draws: the loss moves with the memory model's weights, and writing with
    the generator itself (downsample: the same frames kept) or keeping every frame (full) gives
    other losses."""
    trainer = _trainer(_mag(teacher, memory), tmp_path / "mag")
    generator = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        base = _generator_loss(trainer)
        again = _generator_loss(trainer)
        for p in trainer.dmd.memory_model.parameters():
            p.add_(torch.randn(p.shape,
                               generator=torch.Generator().manual_seed(p.numel())) * PERTURBATION)
        perturbed = _generator_loss(trainer)
    assert torch.equal(base, again) and not torch.isclose(base, perturbed, rtol=1e-4, atol=0)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in generator.items())
    for policy, kind in (("downsample", DownsamplePolicy), ("full", FullPolicy)):
        other = _trainer(_mag(teacher, None, dmd={"rollout_policy": policy}), tmp_path / policy)
        assert type(other.dmd.policy) is kind and other.dmd.memory_model is None
        with torch.no_grad():
            assert not torch.isclose(_generator_loss(other), base, rtol=1e-4, atol=0), policy


def test_history_loss_weight_changes_the_generator_loss_and_gradient(teacher, memory, tmp_path):
    results = []
    for lam in (0.0, 0.5):
        trainer = _trainer(_mag(teacher, memory, dmd={"history_lambda": lam,
                                                      "history_mode": "weight"}),
                           tmp_path / str(lam))
        loss = _generator_loss(trainer)
        loss.backward()
        results.append((loss.detach(),
                        torch.cat([p.grad.flatten() for p in trainer.model.parameters()])))
    (loss0, grad0), (loss1, grad1) = results
    assert torch.isfinite(loss1) and not torch.isclose(loss0, loss1, rtol=1e-4, atol=0)
    assert (grad0 - grad1).abs().max() > 1e-3 * grad0.abs().max()


def test_grad_last_frames_scores_only_windows_with_gradient(teacher, memory, tmp_path):
    full = _trainer(_mag(teacher, memory), tmp_path / "all")
    last = _trainer(_mag(teacher, memory, dmd={"grad_last_frames": 3}), tmp_path / "last")
    assert full.dmd.scored_windows == (0, 1, 2) and last.dmd.scored_windows == (2,)
    # Draws are per window whatever is scored: the last window gets the same loss value either way.
    with torch.no_grad():
        clips = full.dmd._clips(0, 0, range(2))
        draws, t, noise = full.dmd._sample_draws(0, 0, range(2), ROLE_GENERATOR,
                                                 full.dmd.num_windows)
        x = full.dmd._rollout(clips, 2, draws, grad=False)
        only_last, _ = last.dmd._scored_dmd_loss(x, clips, t, noise)
        windows, offsets = full.dmd._windows(x, clips.width_offsets)
        reference, _ = full.dmd._dmd_loss(windows[2:], offsets[2:], t[2:], noise[2:], clips)
    torch.testing.assert_close(only_last, reference, rtol=0, atol=0)
    loss = _generator_loss(last)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in last.model.parameters()) > 0


# ------------------------------------------------------------------------------ bad combinations
def test_bad_rollout_policy_combinations_are_one_clear_error(teacher, memory, tmp_path):
    with pytest.raises(ConfigError, match="rollout_policy = 'mag' needs dmd.memory_model"):
        _mag(teacher, None, dmd={"rollout_policy": "mag"})
    with pytest.raises(ConfigError, match="only 'mag' lets the memory model write"):
        _mag(teacher, memory, dmd={"rollout_policy": "downsample"})
    with pytest.raises(ConfigError,
                       match="dmd.rollout_policy must be one of full, mag, downsample"):
        _mag(teacher, None, dmd={"rollout_policy": "window"})
    with pytest.raises(ConfigError, match="dmd.grad_last_frames must be"):
        _mag(teacher, memory, dmd={"grad_last_frames": 4})
    # A generator file in the memory slot: the stage guard of load_memory_model.
    with pytest.raises(CheckpointError, match="teacher") as err:
        Trainer(_mag(teacher, teacher), tmp_path / "gen", progress=False)
    assert "\n" not in str(err.value)
    # A memory model of another network than the generator.
    with pytest.raises(ConfigError, match=r"different network from the generator: its dit "
                                          r"\(num_layers"):
        Trainer(_mag(teacher, memory, overrides={"dit.num_layers": 1}), tmp_path / "layers",
                progress=False)


# ------------------------------------------------------------------------------ checkpoints
def _other_weights(memory: Path, out: Path) -> Path:
    """A copy of a memory-model file with slightly different weights (same metadata)."""
    with safe_open(str(memory), framework="pt") as f:
        metadata = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(sorted(weights)))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(out), metadata=metadata)
    return out


def test_mag_kill_and_resume_is_bitwise_and_records_the_memory_model(teacher, memory, tmp_path):
    copy = tmp_path / "memory.safetensors"   # a copy this test may overwrite
    copy.write_bytes(memory.read_bytes())
    recipe = _mag(teacher, copy, steps=4, loop={"ckpt_every": 1},
                  dmd={"history_lambda": 0.5, "history_mode": "probability"})
    # between generator updates
    straight = assert_dmd_resume_is_bitwise(recipe, tmp_path, stop_at=3)
    saved = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    record = saved.metadata[MEMORY_MODEL_METADATA]
    assert (
        record["source"] == str(copy) and record["stage"] == "memory" and record["name"] == "memory"
    )
    assert record["weights_sha256"] == straight.dmd.memory_record["weights_sha256"]
    # The same path now holding other weights is refused: the resumed run would not be the same run.
    _other_weights(memory, tmp_path / "changed.safetensors").replace(copy)
    with pytest.raises(CheckpointError, match="other weights than the memory model this run "
                                              "started"):
        Trainer(recipe, tmp_path / "b", resume=True, progress=False)
