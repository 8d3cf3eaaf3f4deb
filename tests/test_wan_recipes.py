"""The wan-1.3b recipes run at reduced shapes (recipe overrides of layers, width, frames) on 2 ranks
with their own bf16 policy, activation checkpointing, hybrid mesh and sharded checkpoints: 2 steps
each, finite losses, and a first step whose losses and gradient norms equal a 1-rank run's within
bf16 tolerance. Init and teacher are official-layout weight files (plain Wan2.1 state dicts).

All four recipes run in one spawned 2-rank gloo group (and one 1-rank group), so Python starts
twice.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import WORLD_SIZE, free_port, random_dit
from safetensors.torch import save_file

from mag.checkpoint import TrainingState, capture_rng, is_dcp_checkpoint, save_checkpoint
from mag.codecs import WanVAECodec
from mag.config import get_preset
from mag.data.encode import encode_videos
from mag.io.video import write_mp4
from mag.models import WanDiT
from mag.objectives.ode import ODEPairs, save_ode_pairs
from mag.registry import export_model
from mag.schedulers import FlowMatchScheduler
from mag.train.distributed import DistributedContext
from mag.train.recipe import recipe_from_dict
from mag.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("ode-init", "self-forcing-dmd", "memory", "mag")
STEPS = 2
# Reduced shapes: 2 layers of width 32, 32x32 video -> 4x4 latents of 4 channels (the tiny VAE's),
# MiniLM text; everything else (objective, optimiser, [parallel]) is the recipe's own.
PRESET_OVERRIDES = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
                    "dit.freq_dim": 16, "dit.text_dim": 384, "dit.in_channels": 4,
                    "dit.out_channels": 4,
                    "video.height": 32, "video.width": 32, "video.latent_channels": 4,
                    "text_encoder": "minilm", "text_max_tokens": 16}
LOOP = {"batch_size": 4, "grad_accum": 2, "log_every": 1, "ckpt_every": STEPS}
# bf16 unit roundoff u = 2^-8; 2u as in test_parallel.py for one network's gradient. The DMD
# generator's gradient also passes through a few-step bf16 rollout, whose kernels differ in their
# low bits with the per-rank batch size: 4u there. Measured worst: 0.0059 (self-forcing-dmd
# generator_grad_norm).
BF16_UNIT_ROUNDOFF = 2.0 ** -8
TOLERANCE = {"loss": 2 * BF16_UNIT_ROUNDOFF, "grad_norm": 2 * BF16_UNIT_ROUNDOFF,
             "generator_loss": 4 * BF16_UNIT_ROUNDOFF,
             "generator_grad_norm": 4 * BF16_UNIT_ROUNDOFF}


def _preset():
    return get_preset("wan-1.3b", **PRESET_OVERRIDES)


def _official_weights(path: Path, seed: int) -> Path:
    """A random network of the reduced shape saved as a plain Wan2.1-named state dict (every
    parameter random: Wan's init zeroes the head, which would make every score, and DMD's gradient,
    zero)."""
    model = random_dit(_preset().dit, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _memory_model_file(root: Path) -> Path:
    """A mag memory-model file of the reduced shape (random weights, exported like a trained
    one)."""
    preset = _preset()
    torch.manual_seed(5)
    state = TrainingState(step=0, model=WanDiT(preset.dit).state_dict(), ema=None, optimizer=None,
                          rng=capture_rng(), metadata={"recipe": {"name": "m"},
                                                       "preset": preset.to_dict()},
                          extra={})
    ckpt = save_checkpoint(root / "memory-run", state)
    return export_model(ckpt, root / "memory.safetensors", name="memory", stage="memory")


def _ode_pairs(root: Path) -> Path:
    preset, frames, clips = _preset(), 6, 4
    levels = FlowMatchScheduler(preset.scheduler, preset.dit.prediction).few_step_timesteps()
    shape = (clips, frames, 4, 4, 4)
    gen = torch.Generator().manual_seed(0)
    pairs = ODEPairs(trajectory=torch.randn(clips, len(levels), *shape[1:], generator=gen),
                     x0=torch.randn(shape, generator=gen), context=torch.randn(clips, 16, 384,
                                                                               generator=gen),
                     timesteps=levels, offsets=torch.zeros(clips, frames))
    return save_ode_pairs(root / "pairs.safetensors", pairs)


def _latent_shards(root: Path) -> Path:
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(1)
    codec = WanVAECodec.tiny_random()
    lines = ["video,caption"]
    for i in range(4):
        frames = rng.integers(0, 256, (codec.video_frames(6), 32, 32, 3), dtype=np.uint8)
        write_mp4(videos / f"{i}.mp4", frames, fps=16, scale=1)
        lines.append(f"{i}.mp4,clip {i}")
    (videos / "captions.csv").write_text("\n".join(lines) + "\n")
    return encode_videos(videos, videos / "captions.csv", root / "shards", frames=6, codec=codec,
                         codec_name="wan-vae", progress=False)


def _reduced(name: str, files: dict[str, Path]) -> dict[str, Any]:
    data = tomllib.loads((REPO / "recipes" / f"wan-1.3b-{name}.toml").read_text())
    data.setdefault("preset_overrides", {}).update(PRESET_OVERRIDES)
    data["loop"].update(LOOP)
    data["init"]["model"] = str(files["generator"])
    data["data"].update(clip_frames=6, prompts=str(files["prompts"]), shards=str(files["shards"]))
    if name == "ode-init":
        data["ode"]["pairs"] = str(files["pairs"])
    if "dmd" in data:
        data["dmd"].update(teacher=str(files["teacher"]), rollout_blocks=2, teacher_frames=6)
    # 4 blocks scored in 6-frame windows sharing a block; gradient in the last block
    if name == "mag":
        data["dmd"].update(memory_model=str(files["memory"]), rollout_blocks=4, grad_last_frames=3)
        data["data"]["clip_frames"] = 12
    return data


def _worker(rank: int, world: int, port: int, recipes: dict[str, dict], root: str,
            steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistributedContext(rank=rank, world_size=world)
        results = {}
        for name, data in recipes.items():
            trainer = Trainer(recipe_from_dict(data), Path(root) / name, progress=False, dist=ctx)
            result = trainer.run(max_steps=steps)
            blocks = trainer.model.blocks
            results[name] = {"loss": result.last_loss, "step": result.step,
                             "metrics": str(result.metrics_path),
                             "checkpoint": str(result.checkpoint),
                             "param_dtype": str(blocks[0].self_attn.q.weight.dtype),
                             "mesh": blocks[0].self_attn.q.weight.device_mesh.mesh_dim_names,
                             "checkpointed": all(getattr(b, "_mag_activation_checkpointing", False)
                                                 for b in blocks)}
        if rank == 0:
            (Path(root) / "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("wan")
    (root / "prompts.txt").write_text("a red ball\na quiet street at night\nwaves\n")
    files = {"generator": _official_weights(root / "generator.safetensors", 1),
             "teacher": _official_weights(root / "teacher.safetensors", 2),
             "memory": _memory_model_file(root), "pairs": _ode_pairs(root),
             "shards": _latent_shards(root), "prompts": root / "prompts.txt"}
    recipes = {name: _reduced(name, files) for name in RECIPES}
    mp.spawn(_worker, args=(WORLD_SIZE, free_port(), recipes, str(root / "two"), STEPS),
             nprocs=WORLD_SIZE)
    mp.spawn(_worker, args=(1, free_port(), recipes, str(root / "one"), 1), nprocs=1)
    return {ranks: json.loads((root / ranks / "results.json").read_text()) for ranks in ("one",
                                                                                         "two")}


@pytest.mark.parametrize("name", RECIPES)
def test_wan_recipe_runs_two_steps_on_two_ranks_with_bf16_and_checkpointing(results, name):
    run = results["two"][name]
    assert run["step"] == STEPS and math.isfinite(run["loss"]), run
    # bf16 compute, float32 master
    assert run["checkpointed"] and run["param_dtype"] == "torch.float32"
    assert run["mesh"] == ["shard"]  # shard_size 8 on 2 GPUs: one shard group of 2
    assert is_dcp_checkpoint(run["checkpoint"])
    if "dmd" in name or name == "mag":  # the generator was updated (step 0) with a finite loss too
        records = [json.loads(line) for line in Path(run["metrics"]).read_text().splitlines()]
        assert any(math.isfinite(r["generator_loss"]) for r in records), records


def _first_record(run: dict) -> dict:
    return json.loads(Path(run["metrics"]).read_text().splitlines()[0])


@pytest.mark.parametrize("name", RECIPES)
def test_wan_recipe_first_step_on_two_ranks_equals_one_rank_within_bf16(results, name):
    """Step 1 starts from the same weights on 1 and 2 ranks: its losses and global gradient norms
    (of the critic and, for DMD, the generator) agree within bf16 tolerance (TOLERANCE)."""
    one, two = _first_record(results["one"][name]), _first_record(results["two"][name])
    keys = [k for k in TOLERANCE if k in one]
    assert len(keys) >= 2
    for key in keys:
        assert math.isfinite(one[key]) and one[key] != 0, (key, one[key])
        assert abs(two[key] - one[key]) <= TOLERANCE[key] * abs(one[key]), (key, one[key], two[key])


def test_every_wan_recipe_loads_at_full_size():
    for name in RECIPES:
        recipe = recipe_from_dict(
            tomllib.loads((REPO / "recipes" / f"wan-1.3b-{name}.toml").read_text())
        )
        assert recipe.preset == "wan-1.3b" and recipe.parallel.mixed_precision == "bf16"
        assert recipe.parallel.activation_checkpointing and recipe.parallel.checkpoint == "dcp"
        assert recipe.loop.batch_size == 64 and recipe.optim.ema_decay == 0.99
