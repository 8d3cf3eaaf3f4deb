"""Sharded (DCP) checkpoints: written by every rank without a gather, resumed bit for bit in float32
on one process or on two ranks.

Reference: a 2-rank run with single-file checkpoints (full tensors, exact copies of the shards). A
2-rank DCP run of the same recipe computes the same numbers, so its step-2 folder must load (1 rank)
into exactly the step-2 file's weights, EMA and AdamW state, and resuming it on 2 ranks must reach
exactly the step-4 file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import recipe_dict, recipe_toml, torchrun_train
from safetensors.torch import load_file

from mag.checkpoint import (
    DCP_METADATA_FILE,
    TrainingState,
    is_dcp_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_dcp_metadata,
)
from mag.cli import main
from mag.errors import CheckpointError
from mag.train.recipe import recipe_from_dict
from mag.train.trainer import Trainer


def _recipe(checkpoint: str) -> dict:
    """Micro-batches of 2 clips: one per rank."""
    return recipe_dict("causal_fm", steps=4, loop={"batch_size": 4},
                       parallel={"checkpoint": checkpoint})


def _recipe_toml(path: Path, checkpoint: str) -> Path:
    path.write_text(recipe_toml(_recipe(checkpoint)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dcp")
    file_recipe, dcp_recipe = _recipe_toml(root / "file.toml",
                                           "file"), _recipe_toml(root / "dcp.toml", "dcp")
    torchrun_train(file_recipe, root / "file")
    torchrun_train(dcp_recipe, root / "dcp", "--max-steps", "2")
    return {"root": root, "file": root / "file", "dcp": root / "dcp", "dcp_recipe": dcp_recipe}


def _trainer_state(trainer: Trainer) -> TrainingState:
    return TrainingState(step=trainer.step, model=trainer.model.state_dict(),
                         ema=trainer.ema.state_dict(),
                         optimizer=trainer.optimizer.state_dict(), rng={}, metadata={}, extra={})


def _assert_bitwise(a: TrainingState, b: TrainingState) -> None:
    assert a.step == b.step
    for section in ("model", "ema"):
        ta, tb = getattr(a, section), getattr(b, section)
        assert ta.keys() == tb.keys() and len(ta) > 0, section
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{section} {key}"
    # JSON (the file's optimizer skeleton) turns tuples such as betas into lists.
    assert json.loads(json.dumps(a.optimizer["param_groups"])) == b.optimizer["param_groups"]
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for pid, slots in a.optimizer["state"].items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(b.optimizer["state"][pid][name])), \
                f"optimizer {pid}.{name}"


def test_two_ranks_write_a_sharded_folder_per_checkpoint(runs):
    (folder,) = list_checkpoints(runs["dcp"] / "checkpoints")
    assert is_dcp_checkpoint(folder) and folder.name == "step_00000002.dcp"
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    assert len(shards) == 2, f"one shard file per rank, got {shards}"  # no rank-0 gather
    meta = read_dcp_metadata(folder)
    assert (meta["step"], meta["world_size"]) == (2, 2)
    assert not list((runs["dcp"] / "checkpoints").glob("*.tmp"))


def test_dcp_checkpoint_of_two_ranks_resumes_bit_exactly_on_one(runs):
    out = runs["root"] / "dcp_on_one"
    shutil.copytree(runs["dcp"], out)
    trainer = Trainer(recipe_from_dict(_recipe("dcp")), out, resume=True, progress=False)
    reference = load_checkpoint(runs["file"] / "checkpoints" / "step_00000002.safetensors")
    _assert_bitwise(_trainer_state(trainer), reference)


def test_dcp_checkpoint_of_two_ranks_resumes_bit_exactly_on_two(runs):
    out = runs["root"] / "dcp_on_two"
    shutil.copytree(runs["dcp"], out)
    torchrun_train(runs["dcp_recipe"], out, "--resume")
    assert latest_checkpoint(out / "checkpoints").name == "step_00000004.dcp"
    # Read the 2-rank step-4 folder back in one process and compare with the uninterrupted run's
    # file.
    probe = runs["root"] / "probe"
    (probe / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_00000004.dcp",
                    probe / "checkpoints" / "step_00000004.dcp")
    trainer = Trainer(recipe_from_dict(_recipe("dcp")), probe, resume=True, progress=False)
    _assert_bitwise(_trainer_state(trainer),
                    load_checkpoint(runs["file"] / "checkpoints" / "step_00000004.safetensors"))
    # Not vacuous: steps 2..4 changed the weights.
    start = load_checkpoint(runs["file"] / "checkpoints" / "step_00000002.safetensors")
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in start.model.items())


def test_mag_export_reads_the_ema_of_a_dcp_run(runs, tmp_path):
    out = tmp_path / "m.safetensors"
    assert main(["export", str(runs["dcp"]), "-o", str(out), "--name", "m", "--stage",
                 "causal"]) == 0
    exported = load_file(str(out))
    ema = load_checkpoint(runs["file"] / "checkpoints" / "step_00000002.safetensors").ema
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_an_incomplete_dcp_folder_is_refused(tmp_path):
    folder = tmp_path / "checkpoints" / "step_00000002.dcp"
    folder.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=DCP_METADATA_FILE):
        read_dcp_metadata(folder)
