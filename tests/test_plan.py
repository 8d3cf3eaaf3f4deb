"""``mag train --plan``: its parameter, gradient, optimizer and EMA bytes are the built model's own
tensors; activations and FLOPs come from meta forwards and behave as they must (checkpointing saves,
more GPUs divide)."""

from __future__ import annotations

import pytest
import torch
from helpers import recipe_dict

from mag.cli import main
from mag.train.plan import networks_of, plan_training, sharded_numel
from mag.train.recipe import load_recipe, recipe_from_dict
from mag.train.trainer import Trainer

STAGE_2 = "recipes/wan-1.3b-mag.toml"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_plan_counts_the_parameter_gradient_optimizer_and_ema_bytes_of_the_built_model(tmp_path):
    recipe = recipe_from_dict(recipe_dict("causal_fm"))
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    trainer.train_step()  # gradients and AdamW state now exist
    plan = plan_training(recipe, gpus=1)
    model = trainer.model
    assert plan.params_bytes == _bytes(model.parameters())
    assert plan.grads_bytes == _bytes(p.grad for p in model.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert plan.optimizer_bytes == _bytes(v for slots in state.values() for v in slots.values()
                                          if isinstance(v, torch.Tensor))
    assert plan.ema_bytes == _bytes(trainer.ema.state_dict().values())
    assert plan.gathered_bytes == 0  # one float32 process gathers nothing


def test_plan_holds_the_dmd_networks_each_once():
    recipe = recipe_from_dict(recipe_dict("dmd", dmd={"teacher": "unused.safetensors",
                                                      "rollout_blocks": 2},
                                          data={"clip_frames": 6}))
    assert [n.name for n in networks_of(recipe)] == ["generator", "critic", "teacher"]
    one = plan_training(recipe_from_dict(recipe_dict("causal_fm")), gpus=1)
    dmd = plan_training(recipe, gpus=1)
    assert dmd.params_bytes == 3 * one.params_bytes
    assert dmd.grads_bytes == 2 * one.grads_bytes and dmd.optimizer_bytes == 2 * one.optimizer_bytes


def test_sharded_counts_pad_dim_zero_like_fsdp():
    layer = torch.nn.Linear(4, 5)  # weight [5, 4], bias [5]: 3 rows per rank on 2 ranks
    assert sharded_numel(layer, 1) == 25
    assert sharded_numel(layer, 2) == 3 * 4 + 3


@pytest.fixture(scope="module")
def stage_2_plans():
    recipe = load_recipe(STAGE_2)
    return {gpus: plan_training(recipe, gpus) for gpus in (1, 8)}


def test_stage_2_plan_on_one_and_eight_gpus(stage_2_plans):
    one, eight = stage_2_plans[1], stage_2_plans[8]
    for plan in (one, eight):
        assert plan.activations_checkpointed_bytes < plan.activations_bytes / 4
        assert plan.total_bytes(checkpointing=True) < plan.total_bytes(checkpointing=False)
    # Sharding divides the weight states (up to FSDP's padding of dim 0: 0.14 % here), the batch
    # divides the activations.
    assert 1 < eight.params_bytes * 8 / one.params_bytes < 1.01
    assert abs(eight.activations_bytes * 8 / one.activations_bytes - 1) < 1e-6
    assert abs(eight.step_flops_per_gpu * 8 / one.step_flops_per_gpu - 1) < 1e-9
    assert not one.fits(checkpointing=True) and not one.fits(checkpointing=False)
    assert eight.fits(checkpointing=True) and not eight.fits(checkpointing=False)


def test_plan_command_prints_both_totals_and_says_what_does_not_fit(capsys):
    assert main(["train", "--plan", "--recipe", STAGE_2, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert (
        "on 8 GPU(s)" in out and "total, checkpointing" in out and "total, no checkpointing" in out
    )
    assert "does NOT fit an 80 GB GPU" in out
    # 8-sample micro-batches
    assert main(["train", "--plan", "--recipe", STAGE_2, "--gpus", "3"]) == 2
