"""Stage-1 memory-model training in the trainer (``objective.kind = "memory"``).

Pins: the shipped recipe shares the camera-anchored causal recipe's preset and world and runs 2
steps; the stage's loss is ``memory_reconstruction_loss`` on the draws of the keyed generators (per
sample: levels then noise; per micro-batch: the start position), with the empty prompt and,
camera-anchored, the clips' camera tracks; draws do not depend on the slice of the batch;
kill-and-resume is bitwise; ``init.model`` really loads the generator (and its absence warns);
checkpoints are memory models to :mod:`mag.registry` and refused in generator slots; the recipe
checks the clip length.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CAMERA, SEED, TINY_OVERRIDES, recipe_dict, trained_model_file

from mag.checkpoint import latest_checkpoint
from mag.errors import CheckpointError, ConfigError
from mag.memory import load_memory_model, sample_memory_timesteps, sample_start_position
from mag.objectives.flow_matching import LossOutput
from mag.objectives.memory import memory_reconstruction_loss
from mag.registry import GENERATOR_STAGES, export_model, load_model, model_stage
from mag.train.recipe import Recipe, load_recipe, recipe_from_dict
from mag.train.steps import ROLE_SHARED_MEMORY, MemoryStep, draw_generator, sample_generator
from mag.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _memory(generator: Path | None, **kwargs) -> Recipe:
    init = {"init": {"model": str(generator)}} if generator is not None else {}
    return recipe_from_dict(recipe_dict("memory", **init, **kwargs))


def _generator(root: Path, overrides: dict | None = None) -> Path:
    return trained_model_file(root, "causal_fm", "causal", "causal", overrides)


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generator(tmp_path_factory.mktemp("generator"))


@pytest.fixture(scope="module")
def camera_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generator(tmp_path_factory.mktemp("camera_generator"), CAMERA)


@pytest.fixture(scope="module")
def memory_run(generator: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step memory run folder."""
    out = tmp_path_factory.mktemp("memory_run")
    Trainer(_memory(generator), out, progress=False).run()
    return out


# ------------------------------------------------------------------------------ recipe
def test_tiny_memory_recipe_matches_the_camera_causal_world_and_runs_two_steps(camera_generator,
                                                                               tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny-memory.toml")
    causal = load_recipe(REPO / "recipes" / "tiny-causal-camera.toml")
    long = load_recipe(REPO / "recipes" / "tiny-causal-camera-long.toml")
    assert recipe.objective.kind == "memory" and recipe.init.model == "tiny-causal-long"
    assert recipe.build_preset().dit == long.build_preset().dit   # the generator it starts from
    assert recipe.preset == causal.preset and recipe.preset_overrides == causal.preset_overrides
    # so the causal model can initialise it
    assert recipe.build_preset().dit == causal.build_preset().dit
    assert recipe.data == causal.data and recipe.loop.seed == causal.loop.seed
    data = recipe.to_dict()
    data.update(preset_overrides={**data["preset_overrides"], **TINY_OVERRIDES},
                loop={**data["loop"], "steps": 2, "batch_size": 1, "log_every": 1, "ckpt_every": 2},
                init={"model": str(camera_generator)})
    result = Trainer(recipe_from_dict(data), tmp_path, progress=False).run()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"loss", "grad_norm", "loss_new", "loss_recent",
                "loss_recall"} <= r.keys() for r in records)


def test_memory_recipe_checks_the_clip_length():
    with pytest.raises(ConfigError, match="clip_frames=7"):
        recipe_from_dict(recipe_dict("memory", data={"clip_frames": 7}))
    with pytest.raises(ConfigError, match="rope_max_positions=3"):
        recipe_from_dict(recipe_dict("memory", overrides={"dit.rope_max_positions": 3}))
    with pytest.raises(ConfigError, match="memory"):  # the kinds listed by the error include memory
        recipe_from_dict(recipe_dict("memroy"))


# ------------------------------------------------------------------------------ the loss
def _by_hand(trainer: Trainer, step: int, micro: int, indices: range, *, camera: bool,
             still: bool = False) -> LossOutput:
    """``memory_reconstruction_loss`` on draws made here from the keyed generators, not by the stage
    (``still``: a camera-anchored model told the camera never moved)."""
    preset, scheduler = trainer.preset, trainer.scheduler
    fpb = preset.cache.frames_per_block
    batch = trainer.data.batch(step, micro, indices)
    frames = batch.video.shape[1]
    levels, noise = [], []
    for i in indices:
        gen = sample_generator(SEED, step, micro, i)
        levels.append(sample_memory_timesteps(scheduler, 1, frames // fpb, generator=gen))
        noise.append(torch.randn(batch.video.shape[1:], generator=gen))
    start = sample_start_position(frames, fpb, preset.dit.rope_max_positions,
                                  generator=draw_generator(SEED, step, micro, 0,
                                                           ROLE_SHARED_MEMORY))
    offsets = batch.camera_px / preset.dit.patch_size[2] if camera else None
    if still:
        offsets = torch.zeros_like(batch.camera_px)
    empty = trainer.text.get([""])
    return memory_reconstruction_loss(trainer.model, scheduler, batch.video, empty,
                                      torch.stack(noise), torch.cat(levels), start, offsets)


@pytest.mark.parametrize("camera", [False, True], ids=["plain", "camera"])
def test_stage_loss_is_the_reconstruction_loss_on_the_keyed_draws(camera, generator,
                                                                  camera_generator, tmp_path):
    source = camera_generator if camera else generator
    trainer = Trainer(_memory(source, overrides=CAMERA if camera else None), tmp_path,
                      progress=False)
    assert isinstance(trainer.runner, MemoryStep)
    # every weight random: Wan's zeroed head, 2 steps on, would hide the inputs
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    step, micro, indices = 3, 1, range(2)
    out, categories = trainer.runner.loss(trainer.model, step, micro, indices)
    expected = _by_hand(trainer, step, micro, indices, camera=camera)
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.per_element,
                                                                expected.per_element)
    assert out.per_element.shape == (2, 6, 3, 16, 16) and categories.shape == (2, 6, 16)
    if camera:  # the camera track really reaches the model
        still = _by_hand(trainer, step, micro, indices, camera=True, still=True)
        assert (out.per_element - still.per_element).abs().max() > 1e-2


def test_draws_stay_on_the_grid_and_do_not_depend_on_the_batch_slice(generator, tmp_path):
    trainer = Trainer(_memory(generator), tmp_path, progress=False)
    stage, fpb = trainer.runner, trainer.preset.cache.frames_per_block
    clip_shape = (6, 3, 16, 16)
    both = stage.draws(2, 1, range(2), clip_shape)
    second = stage.draws(2, 1, range(1, 2), clip_shape)  # what rank 1 of 2 draws
    assert torch.equal(both.noise[1:], second.noise) and torch.equal(both.timestep[1:],
                                                                     second.timestep)
    assert both.start_position == second.start_position
    assert not torch.equal(both.noise[0], both.noise[1])
    assert both.timestep.shape == (2, 2)
    assert set(both.timestep.flatten().tolist()) <= set(
        trainer.scheduler.few_step_timesteps().tolist()
    )
    starts = {stage.draws(s, 0, range(1), clip_shape).start_position for s in range(8)}
    limit = trainer.preset.dit.rope_max_positions - clip_shape[0]
    assert len(starts) > 1 and all(s % fpb == 0 and 0 <= s <= limit for s in starts)


# ------------------------------------------------------------------------------ resume, init, stage
def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for pid, slots in trainer.optimizer.state_dict()["state"].items():
        state.update({f"optim.{pid}.{k}": v for k, v in slots.items()})
    return {k: v.detach().clone() for k, v in state.items()}


def test_memory_kill_and_resume_is_bitwise_identical(generator, tmp_path):
    recipe = _memory(generator, steps=4, loop={"ckpt_every": 1})
    straight = Trainer(recipe, tmp_path / "a", progress=False)
    straight.run()
    first = Trainer(recipe, tmp_path / "b", progress=False)
    first.run(max_steps=2)
    del first
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_model_loads_the_generator_and_its_absence_warns(generator, tmp_path):
    source = load_model(generator)[0].state_dict()
    trainer = Trainer(_memory(generator), tmp_path / "a", progress=False)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), source[name]), name
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(value, source[name]), f"ema {name}"
    trainer.run()  # separate weights: training the memory model leaves the generator file alone
    assert any(not torch.equal(p.detach(), source[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(v, load_model(generator)[0].state_dict()[k]) for k, v in source.items())
    with pytest.warns(UserWarning, match="without init.model"):
        scratch = Trainer(_memory(None), tmp_path / "b", progress=False)
    assert any(not torch.equal(p.detach(), source[n]) for n, p in scratch.model.named_parameters())


def test_memory_checkpoints_are_memory_models_and_refused_as_generators(memory_run, tmp_path):
    ckpt = latest_checkpoint(memory_run / "checkpoints")
    model, preset, meta = load_memory_model(ckpt)
    assert (
        model_stage(meta) == "memory" and preset.dit.num_layers == TINY_OVERRIDES["dit.num_layers"]
    )
    with pytest.raises(CheckpointError, match="'memory' model"):
        load_model(ckpt, expect_stage=GENERATOR_STAGES)
    exported = export_model(ckpt, tmp_path / "memory.safetensors", name="memory", stage="memory")
    assert load_memory_model(exported)[2]["stage"] == "memory"
    with pytest.raises(CheckpointError, match="'memory' model"):
        load_model(exported, expect_stage=GENERATOR_STAGES)
