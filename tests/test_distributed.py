"""Data-parallel FSDP2 training on CPU (gloo, 2 processes via torchrun) follows the single-process
run.

The 2-process runs go through the real entry point, ``python -m torch.distributed.run ... -m
mag.train``, on 127.0.0.1 only, one thread per process.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import WORLD_SIZE, torchrun_train

from mag.checkpoint import TrainingState, latest_checkpoint, load_checkpoint
from mag.errors import ConfigError
from mag.train.distributed import DistributedContext, init_distributed
from mag.train.recipe import load_recipe
from mag.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
                  "dit.freq_dim": 16, "video.height": 16, "video.width": 16}
LR = 1e-3
# Micro-batches of 2 clips (batch 4, accumulation 2): one clip per rank, and accumulation under
# FSDP.
RECIPE = (
    'name = "dist"\npreset = "tiny"\n[preset_overrides]\n'
    + "".join(f'"{k}" = {v}\n' for k, v in TINY_OVERRIDES.items())
    + "[loop]\nsteps = 4\nbatch_size = 4\ngrad_accum = 2\nlog_every = 1\nckpt_every = "
      "2\nkeep_last = 5\n"
    + f"seed = 7\n[optim]\nlr = {LR}\nwarmup_steps = 2\nema_decay = 0.9\n"
    + "[data]\nclip_frames = 6\n[data.world]\npano_width = 64\n"
)
# Tolerances, each sized to the effect it guards (single process vs 2 ranks):
# - weights and EMA, in units of the learning rate (AdamW moves a weight by about lr per step
#   whatever the gradient's scale): float noise reaches 2e-3 lr after 4 steps, in cross_attn.k.bias,
#   whose true gradient is zero (softmax ignores a per-query constant) so AdamW scales its noise by
#   lr / eps; a doubled gradient (a loss-scaling bug) moved weights by 0.13 lr. So 1e-2 lr.
WEIGHT_TOLERANCE = 1e-2 * LR
# - AdamW moments, relative to the largest value of the same moment over all parameters (exp_avg_sq
#   is about 1e-5 at most, so an absolute bound would be vacuous): float noise reaches 1e-6 of it; a
#   doubled gradient doubles exp_avg and quadruples exp_avg_sq.
STATE_RELATIVE = 1e-4
# - logged losses and gradient norms, relative: float noise reaches 1e-7; a scaling bug changes them
#   by 1.
LOG_RELATIVE = 1e-5
LOGGED = ("loss", "grad_norm", "loss_new", "loss_recent", "loss_recall")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-step single-process run, and a 2-process run of its first 2 steps."""
    root = tmp_path_factory.mktemp("dist")
    recipe = root / "dist.toml"
    recipe.write_text(RECIPE)
    Trainer(load_recipe(recipe), root / "single", progress=False).run()
    torchrun_train(recipe, root / "fsdp", "--max-steps", "2")
    return {"root": root, "recipe": recipe, "single": root / "single", "fsdp": root / "fsdp"}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run: Path, step: int) -> TrainingState:
    return load_checkpoint(run / "checkpoints" / f"step_{step:08d}.safetensors")


def _assert_states_close(a: TrainingState, b: TrainingState) -> None:
    assert a.step == b.step
    for section in ("model", "ema"):
        ta, tb = getattr(a, section), getattr(b, section)
        assert ta.keys() == tb.keys(), section
        for key in ta:
            assert ta[key].shape == tb[key].shape, (section, key)
            diff = (ta[key] - tb[key]).abs().max().item()
            assert diff <= WEIGHT_TOLERANCE, f"{section} {key} differs by {diff:.3g}"
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    state = a.optimizer["state"]
    scale = {
        name: max(slots[name].abs().max().item() for slots in state.values()) for name in state[0]
    }
    for pid, slots in state.items():
        for name, value in slots.items():
            diff = (value - b.optimizer["state"][pid][name]).abs().max().item()
            assert diff <= STATE_RELATIVE * scale[name], (
                f"optimizer state {pid}.{name} differs by {diff:.3g}"
            )


def _assert_logs_close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in LOGGED:
            if math.isnan(ra[key]):
                assert math.isnan(rb[key]), (ra["step"], key)
            else:
                close = abs(ra[key] - rb[key]) <= LOG_RELATIVE * abs(ra[key])
                assert close, (ra["step"], key, ra[key], rb[key])


def test_two_ranks_log_the_single_process_losses(runs):
    fsdp = _records(runs["fsdp"])
    assert len(fsdp) == 2, "only the main rank writes metrics"
    _assert_logs_close(_records(runs["single"])[:2], fsdp)


def test_two_ranks_end_with_the_single_process_weights_ema_and_optimizer(runs):
    fsdp = _ckpt(runs["fsdp"], 2)
    assert fsdp.metadata["world_size"] == WORLD_SIZE
    assert [p.name for p in (runs["fsdp"] / "checkpoints").iterdir()] == [
        "step_00000002.safetensors"
    ]
    single = _ckpt(runs["single"], 2)
    _assert_states_close(single, fsdp)
    # The comparison is not vacuous: training moved the weights away from the initialisation.
    fresh = Trainer(load_recipe(runs["recipe"]), runs["root"] / "fresh", progress=False)
    assert any((fsdp.model[k] - v).abs().max() > LR for k, v in fresh.model.state_dict().items())


def test_two_rank_checkpoint_resumes_in_a_single_process(runs):
    out = runs["root"] / "fsdp_then_single"
    shutil.copytree(runs["fsdp"], out)
    trainer = Trainer(load_recipe(runs["recipe"]), out, resume=True, progress=False)
    assert trainer.step == 2
    trainer.run()
    _assert_states_close(_ckpt(runs["single"], 4),
                         load_checkpoint(latest_checkpoint(out / "checkpoints")))
    _assert_logs_close(_records(runs["single"]), _records(out))


def test_two_ranks_resume_from_a_single_process_checkpoint(runs):
    out = runs["root"] / "single_then_fsdp"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(runs["single"] / "checkpoints" / "step_00000002.safetensors", out / "checkpoints")
    torchrun_train(runs["recipe"], out, "--resume")
    _assert_states_close(_ckpt(runs["single"], 4), _ckpt(out, 4))
    _assert_logs_close(_records(runs["single"])[2:], _records(out))


def test_models_and_cache_never_import_torch_distributed():
    """Parallelism is applied from outside: only mag/train/{distributed,parallelize}.py may use
    it."""
    files = sorted((REPO / "mag" / "models").rglob("*.py")) + sorted(
        (REPO / "mag" / "cache").rglob("*.py")
    )
    assert len(files) > 1
    pattern = re.compile(r"torch\.distributed|from torch import .*\bdistributed\b")
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text())]
    assert offenders == []


def test_batch_slices_split_each_micro_batch_into_disjoint_equal_parts():
    slices = [DistributedContext(rank=r, world_size=4).batch_slice(8) for r in range(4)]
    assert [list(s) for s in slices] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert DistributedContext().batch_slice(3) == range(3)
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        DistributedContext(rank=1, world_size=3).batch_slice(4)


def test_trainer_refuses_a_micro_batch_the_ranks_cannot_share(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)  # micro-batch of 2 clips
    with pytest.raises(ConfigError, match=r"micro-batch .* = 2\) must be divisible .* \(3\)"):
        Trainer(load_recipe(recipe), tmp_path / "out", dist=DistributedContext(rank=0,
                                                                               world_size=3))


def test_torchrun_environment_is_read_or_refused_clearly():
    single = init_distributed("cpu", env={})
    assert (single.world_size, single.rank, single.is_main, single.is_distributed) == (1, 0, True,
                                                                                       False)
    assert init_distributed("cpu", env={"WORLD_SIZE": "1", "RANK": "0"}).world_size == 1
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match="RANK must be an integer"):
        init_distributed("cpu", env={"WORLD_SIZE": "2", "RANK": "one"})
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set"):
        init_distributed("cpu", env={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match=r"RANK=2 must lie in \[0, WORLD_SIZE=2\)"):
        init_distributed("cpu", env={"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="device mesh needs a process group"):
        single.mesh()
