"""Builders shared by several test modules (import as ``from helpers import ...``; pytest puts
tests/ on the path). Fixtures live in conftest.py; plain functions that build tiny models, recipes
and model files live here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mag.checkpoint import latest_checkpoint
from mag.config import DiTConfig
from mag.io.video import write_mp4
from mag.models import WanDiT
from mag.registry import export_model
from mag.train.recipe import recipe_from_dict
from mag.train.trainer import Trainer

# A tiny network on 16x16 frames: trains a step in well under a second on one CPU thread.
TINY_OVERRIDES = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
                  "dit.freq_dim": 16, "video.height": 16, "video.width": 16}
CAMERA = {"dit.camera_rope": True}
SEED = 7
REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
TORCHRUN_TIMEOUT_S = 300
PORT_ATTEMPTS = 3

# TorchInductor's CPU backend builds C++ kernels: it needs a C compiler and the Python headers.
needs_inductor = pytest.mark.skipif(
    (shutil.which("cc") or shutil.which("gcc")) is None
    or not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
    reason="TorchInductor's CPU backend needs a C compiler and the Python headers")


# Spread of randomised parameters: large enough that every parameter visibly moves the output, small
# enough that a tiny DiT stays well conditioned (no saturated softmax) in float32.
RANDOM_PARAMETER_STD = 0.3


def randomise_parameters_(model: torch.nn.Module) -> torch.nn.Module:
    """Draw EVERY parameter (norm weights and biases, modulation tables included) from the current
    torch RNG. Default initialisations set norm weights to 1 and biases to 0, so a weight loaded
    into the wrong norm (or a modulation table into the wrong slot) would change nothing; random
    values make every mapping error visible in an output comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * RANDOM_PARAMETER_STD)
    return model


def random_dit(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    """A WanDiT whose every parameter is random (Wan's init zeroes the head, which would make output
    comparisons vacuous), in eval mode."""
    torch.manual_seed(seed)
    return randomise_parameters_(WanDiT(cfg)).eval()


def recipe_dict(kind: str, *, steps: int = 2, overrides: dict | None = None,
                **sections: Any) -> dict:
    """A tiny recipe of objective ``kind`` as a dict; ``sections`` update whole sections."""
    data: dict[str, Any] = {
        "name": f"test-{kind}", "preset": "tiny", "preset_overrides": {**TINY_OVERRIDES,
                                                                       **(overrides or {})},
        "objective": {"kind": kind},
        "loop": {"steps": steps, "batch_size": 2, "grad_accum": 2, "log_every": 1, "ckpt_every": 2,
                 "keep_last": 5, "seed": SEED},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9},
        "data": {"clip_frames": 6, "world": {"pano_width": 64}},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def recipe_toml(data: dict) -> str:
    """A recipe dict (as :func:`recipe_dict` makes) as TOML text, for runs through `mag train`."""
    lines = [f'name = "{data["name"]}"', f'preset = "{data["preset"]}"']
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"[{section}]")
        lines += [f'"{k}" = {json.dumps(v)}' for k, v in values.items() if not isinstance(v, dict)]
        for key, table in values.items():
            if isinstance(table, dict):
                lines.append(f"[{section}.{key}]")
                lines += [f'"{k}" = {json.dumps(v)}' for k, v in table.items()]
    return "\n".join(lines) + "\n"


def trained_model_file(root: Path, kind: str, name: str, stage: str,
                       overrides: dict | None = None) -> Path:
    """A model file after 2 steps of objective ``kind`` (exported like a shipped model)."""
    Trainer(recipe_from_dict(recipe_dict(kind, overrides=overrides)), root / "run",
            progress=False).run()
    return export_model(latest_checkpoint(root / "run" / "checkpoints"),
                        root / f"{name}.safetensors", name=name, stage=stage)


def memory_model_file(root: Path, generator: Path, steps: int = 2) -> Path:
    """A camera-anchored memory-model file after ``steps`` memory steps from ``generator``'s
    weights."""
    data = recipe_dict("memory", steps=steps, overrides=CAMERA, init={"model": str(generator)})
    Trainer(recipe_from_dict(data), root / "run", progress=False).run()
    return export_model(latest_checkpoint(root / "run" / "checkpoints"),
                        root / "memory.safetensors", name="memory", stage="memory")


def dmd_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Everything a DMD run carries: generator, EMA, critic and both AdamW states (cloned)."""
    state = {f"gen.{k}": v for k, v in trainer.model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    state.update({f"critic.{k}": v for k, v in trainer.dmd.critic.state_dict().items()})
    for prefix, optimizer in (("gopt", trainer.optimizer), ("copt", trainer.dmd.critic_optimizer)):
        for pid, slots in optimizer.state_dict()["state"].items():
            state.update({f"{prefix}.{pid}.{k}": v for k, v in slots.items()})
    return {k: v.detach().clone() for k, v in state.items()}


def assert_dmd_resume_is_bitwise(recipe: Any, root: Path, stop_at: int = 3) -> Trainer:
    """Run ``recipe`` straight, and again stopped at ``stop_at`` then resumed: every DMD state
    tensor must be bitwise equal. Returns the straight run (its files are under ``root / "a"``)."""
    straight = Trainer(recipe, root / "a", progress=False)
    straight.run()
    first = Trainer(recipe, root / "b", progress=False)
    first.run(max_steps=stop_at)
    del first
    resumed = Trainer(recipe, root / "b", resume=True, progress=False)
    assert resumed.step == stop_at
    resumed.run()
    a, b = dmd_state(straight), dmd_state(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return straight


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(recipe: Path, out: Path, *extra: str) -> None:
    """``torchrun --nproc_per_node=2 -m mag.train`` on 127.0.0.1, one thread per process.

    The free port is probed, then bound by torchrun a moment later; if another process took it in
    between, the launch is retried on a new port.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for _ in range(PORT_ATTEMPTS):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "mag.train", "--recipe", str(recipe), "--out", str(out), "--no-progress",
               "--threads", "1", *extra]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TORCHRUN_TIMEOUT_S)
        output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        if done.returncode == 0 or "address already in use" not in output.lower():
            break
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{output}"


def folder_tree(folder: Path) -> dict[str, bytes | str]:
    """Every path under ``folder`` with its bytes (regular files) or its mode string (the rest),
    so a test can assert that nothing on disk changed, not even a link, FIFO or device node."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        out[str(path.relative_to(folder))] = (
            path.read_bytes() if stat.S_ISREG(mode) else stat.filemode(mode)
        )
    return out


def write_captioned_videos(root: Path, captions: list[str], frames: int, size: int,
                           seed: int = 0) -> Path:
    """``root/v{i}.mp4`` (random ``frames x size x size`` clips, 16 fps) and ``root/captions.csv``
    naming each with its caption: the input of ``mag data encode``."""
    rng = np.random.default_rng(seed)
    lines = ["video,caption"]
    for i, caption in enumerate(captions):
        write_mp4(root / f"v{i}.mp4", rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
                  fps=16, scale=1)
        lines.append(f'v{i}.mp4,"{caption}"')
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root
