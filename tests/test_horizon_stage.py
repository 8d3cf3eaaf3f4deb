"""The ``horizon`` objective: flow matching on blocks of loop clips that read the two-tier memory.

Pins: the shipped recipe parses and runs 2 steps on a tiny override; a scored block's output is the
model's prediction from the cache an inference stream under ``archive`` (memory-model writer) holds
at that block; the return reads frames retrieved from the archive (with retrieval
turned off its output changes); gradient reaches the generator only; draws are keyed and independent
of the batch slice; bad recipes are one ConfigError / CheckpointError; kill-and-resume is bitwise
and the memory model is recorded and checked on resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    CAMERA,
    TINY_OVERRIDES,
    memory_model_file,
    random_dit,
    recipe_dict,
    trained_model_file,
)

from mag.cache import ArchiveCache
from mag.checkpoint import latest_checkpoint, load_checkpoint
from mag.errors import CheckpointError, ConfigError
from mag.objectives.flow_matching import flow_matching_target
from mag.pipelines import StreamingGenerator, policy_from_name, writer_for
from mag.train.recipe import Recipe, load_recipe, recipe_from_dict
from mag.train.steps import MEMORY_MODEL_METADATA, HorizonStep
from mag.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# A 64-px panorama seen by 16-px frames at 4 px/frame: regions of 4 steps, a 4-frame pan; 48-frame
# loop clips (16 blocks) whose return comes 24-30 frames after A was left, past the 4-slot ring.
CLIP_FRAMES = 48
WORLD = {"pano_width": 64, "trajectory": "loop", "dwell_frames_range": [24, 30],
         "episode_frames": CLIP_FRAMES, "speed_range_px": [4, 4], "speed_quantum_px": 4}


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model_file(tmp_path_factory.mktemp("generator"), "causal_fm", "causal",
                              "causal", CAMERA)


@pytest.fixture(scope="module")
def memory(generator: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return memory_model_file(tmp_path_factory.mktemp("memory"), generator)


def _recipe(memory: Path | str, steps: int = 2, cfg_dropout: float = 0.1,
            **horizon: object) -> Recipe:
    return recipe_from_dict(recipe_dict(
        "horizon", steps=steps, overrides=CAMERA,
        objective={"kind": "horizon", "cfg_dropout": cfg_dropout},
        horizon={"memory_model": str(memory), "return_blocks": 2, "other_blocks": 2, **horizon},
        data={"clip_frames": CLIP_FRAMES, "world": WORLD}))


def _trainer(recipe: Recipe, root: Path) -> Trainer:
    """A trainer whose generator has random weights everywhere (Wan's init zeroes the head)."""
    trainer = Trainer(recipe, root, progress=False)
    with torch.no_grad():
        trainer.model.load_state_dict(random_dit(recipe.build_preset().dit, seed=1).state_dict())
    return trainer


# ------------------------------------------------------------------------------ recipe
def test_recipe_parses_and_runs_two_steps_on_a_tiny_override(generator, memory, tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny-horizon.toml")
    assert recipe.objective.kind == "horizon" and recipe.causal
    assert recipe.init.model == "tiny-causal-long" and recipe.horizon.memory_model == "tiny-memory"
    world = recipe.data.world
    # Returns come later than the 60-frame clips the generator was trained on.
    assert world["trajectory"] == "loop" and world["dwell_frames_range"][0] >= 60
    data = recipe.to_dict()
    data.update(preset_overrides={**data["preset_overrides"], **TINY_OVERRIDES},
                loop={**data["loop"], "steps": 2, "batch_size": 1, "log_every": 1, "ckpt_every": 2},
                init={"model": str(generator)}, horizon={**data["horizon"],
                                                         "memory_model": str(memory)})
    result = Trainer(recipe_from_dict(data), tmp_path, progress=False).run()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_bad_recipes_are_one_clear_error(generator, memory):
    with pytest.raises(ConfigError, match="needs horizon.memory_model"):
        _recipe("")
    with pytest.raises(ConfigError, match="not both 0"):
        _recipe(memory, return_blocks=0, other_blocks=0)
    with pytest.raises(ConfigError, match="too few"):
        _recipe(memory, return_blocks=8, other_blocks=8)
    with pytest.raises(CheckpointError):  # a generator file where the memory model belongs
        Trainer(_recipe(generator), Path("/nonexistent-never-written"), progress=False)


# ------------------------------------------------------------------------------ the stream
def _inference_outputs(step: HorizonStep, model: torch.nn.Module, memory_model: torch.nn.Module,
                       video: torch.Tensor, camera: torch.Tensor, context: torch.Tensor,
                       draws) -> torch.Tensor:
    """What an inference stream under ``archive`` predicts at the scored blocks, built from the
    public pieces (policy by name, the memory model's writer) and teacher-forced block by block."""
    ctx, fpb = step.ctx, step.frames_per_block
    policy = policy_from_name("archive", ctx.preset)
    gen = StreamingGenerator(model, ctx.scheduler, ctx.preset, policy,
                             writer=writer_for(policy, memory_model=memory_model,
                                               empty_context=ctx.empty_context))
    gen.reset(video.shape[0], video.shape[1])
    gen.set_prompt(context)
    outputs = []
    for block in range(video.shape[1] // fpb):
        frames = slice(block * fpb, (block + 1) * fpb)
        if block in draws.scored:
            k = draws.scored.index(block)
            gen.cache.prepare_block(frames.start, camera[:, frames])
            position = gen.cache.rope_position(frames.start)
            t = draws.timestep[:, k]
            x_t = ctx.scheduler.add_noise(video[:, frames], draws.noise[:, k], t)
            with torch.no_grad():
                outputs.append(model(x_t, t, context, kv_cache=gen.cache,
                                     frame_positions=torch.arange(position, position + fpb),
                                     width_offsets=camera[:, frames]))
        gen.feed(video[:, frames], camera[:, frames])
    return torch.cat(outputs, 1)


def test_scored_blocks_read_what_an_archive_stream_holds(memory, tmp_path):
    trainer = _trainer(_recipe(memory, cfg_dropout=0.0), tmp_path)
    step = trainer.runner
    assert isinstance(step, HorizonStep)
    indices = range(2)
    batch = step.ctx.data.batch(0, 0, indices)
    draws = step.draws(0, 0, indices, (3, *batch.video.shape[2:]))
    assert draws.scored[-2:] == (14, 15) and len(draws.scored) == 4
    assert all(step.first_block <= b < 14 for b in draws.scored[:2])
    out, categories = step.loss(trainer.model, 0, 0, indices)
    expected = _inference_outputs(step, trainer.model, step.memory_model, batch.video,
                                  step.ctx.width_offsets(batch.camera_px),
                                  step.ctx.context(batch), draws)
    frames = torch.cat([torch.arange(b * 3, b * 3 + 3) for b in draws.scored])
    x0 = batch.video[:, frames]
    target = flow_matching_target(step.ctx.scheduler, x0, draws.noise.flatten(1, 2))
    torch.testing.assert_close(out.per_element, (expected - target) ** 2, rtol=1e-5, atol=1e-6)
    assert categories.shape == (2, len(frames), batch.video.shape[-1])


def test_the_return_reads_frames_retrieved_from_the_archive(memory, tmp_path, monkeypatch):
    trainer = _trainer(_recipe(memory), tmp_path)
    step = trainer.runner
    retrieved: list[int] = []
    original = ArchiveCache._retrieve

    def recording(cache: ArchiveCache) -> None:
        original(cache)
        retrieved.append(int((cache.retrieved >= 0).sum()))

    monkeypatch.setattr(ArchiveCache, "_retrieve", recording)
    plain = step.loss(trainer.model, 0, 0, range(2))[0].per_element[:, -6:]
    assert max(retrieved) == 2 * step.policy.retrieval_slots  # both samples, every slot
    monkeypatch.setattr(ArchiveCache, "_retrieve", lambda cache: None)  # retrieval slots empty
    without = step.loss(trainer.model, 0, 0, range(2))[0].per_element[:, -6:]
    assert not torch.allclose(plain, without)


def test_only_the_generator_gets_gradient(memory, tmp_path):
    trainer = _trainer(_recipe(memory), tmp_path)
    step = trainer.runner
    out, _ = step.loss(trainer.model, 0, 0, range(2))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in trainer.model.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in step.memory_model.parameters())


def test_draws_are_keyed_and_independent_of_the_batch_slice(memory, tmp_path):
    step = _trainer(_recipe(memory), tmp_path).runner
    shape = (3, 3, 16, 16)
    both, again = step.draws(5, 1, range(2), shape), step.draws(5, 1, range(2), shape)
    second = step.draws(5, 1, range(1, 2), shape)
    assert both.scored == again.scored == second.scored
    torch.testing.assert_close(both.noise, again.noise, rtol=0, atol=0)
    torch.testing.assert_close(both.noise[1:], second.noise, rtol=0, atol=0)
    torch.testing.assert_close(both.timestep[1:], second.timestep, rtol=0, atol=0)
    other_steps = {step.draws(s, 0, range(1), shape).scored for s in range(6)}
    assert len(other_steps) > 1


# ------------------------------------------------------------------------------ checkpoints
def test_resume_is_bitwise_and_the_memory_model_is_checked(memory, generator, tmp_path):
    recipe = _recipe(memory, steps=4)
    straight = Trainer(recipe, tmp_path / "a", progress=False)
    straight.run()
    first = Trainer(recipe, tmp_path / "b", progress=False)
    first.run(max_steps=2)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    state = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    record = state.metadata[MEMORY_MODEL_METADATA]
    assert record["stage"] == "memory" and len(record["weights_sha256"]) == 64
    # The same path now holding other weights: the resumed run would not be the same run.
    memory_copy = tmp_path / "memory.safetensors"
    memory_copy.write_bytes(memory.read_bytes())
    moved = _recipe(memory_copy, steps=6)
    Trainer(moved, tmp_path / "c", progress=False).run(max_steps=1)
    retrained = memory_model_file(tmp_path / "retrained", generator, steps=3)
    memory_copy.write_bytes(retrained.read_bytes())
    with pytest.raises(CheckpointError, match="other weights than the memory model"):
        Trainer(moved, tmp_path / "c", resume=True, progress=False)
