"""``mag bench memory``: memory reconstruction on held-out clips, end to end, and its input errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_OVERRIDES, trained_model_file

from mag.bench.memory_recon import FEW_STEP, TARGET_PSNR_DB, clip_length, one_step_label, reconstruct
from mag.cli import main
from mag.config import get_preset
from mag.errors import ConfigError
from mag.schedulers import FlowMatchScheduler

EPISODES = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(memory model file, generator model file)``: 2 training steps each, the tiny test network."""
    root = tmp_path_factory.mktemp("models")
    with pytest.warns(UserWarning, match="without init.model"):
        memory = trained_model_file(root / "memory", "memory", "test-memory", "memory")
    return memory, trained_model_file(root / "causal", "causal_fm", "test-causal", "causal")


def _run(*args: str) -> int:
    return main(["bench", "memory", "--no-progress", "--no-lpips", *args])


def test_cli_writes_json_table_and_strip(tmp_path, models, capsys):
    memory, causal = models
    out = tmp_path / "recon"
    assert _run("--memory-model", str(memory), "--baseline-model", str(causal), "--episodes", str(EPISODES),
                "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    levels = FlowMatchScheduler(get_preset("tiny", **TINY_OVERRIDES).scheduler).few_step_timesteps().tolist()
    assert summary["levels"] == pytest.approx(levels) and summary["target_psnr_db"] == TARGET_PSNR_DB
    assert summary["clip_frames"] == 6 and summary["frames_per_block"] == 3  # the recipe's clip length
    assert len(summary["episodes"]) == EPISODES
    assert set(summary["models"]) == {"memory", "baseline"}
    assert set(summary["references"]) == {"codec", "copy-retained"}
    for name in ("memory", "baseline"):
        rows = summary["models"][name]
        assert list(rows) == [one_step_label(level) for level in levels] + [FEW_STEP]
        for row in rows.values():
            assert 0 < row["psnr"] < 60 and row["ssim"] is not None and row["lpips"] is None  # --no-lpips
            assert row["frames"] == EPISODES * 6 and row["non_retained"]["frames"] == EPISODES * 4
            assert row["retained"]["frames"] == EPISODES * 2 and len(row["per_episode_psnr"]) == EPISODES
    # Different weights, same noise: different reconstructions. The pixel codec's round trip is exact;
    # copying the retained frame is exact on retained frames only.
    assert summary["models"]["memory"][FEW_STEP]["psnr"] != summary["models"]["baseline"][FEW_STEP]["psnr"]
    assert summary["references"]["codec"]["round trip"]["psnr"] == 100.0
    copy = summary["references"]["copy-retained"]["retained frame"]
    assert copy["retained"]["psnr"] == 100.0 and copy["non_retained"]["psnr"] < 60
    meta = summary["metadata"]
    assert meta["models"]["memory"]["stage"] == "memory" and meta["models"]["baseline"]["stage"] == "causal"
    assert meta["models"]["memory"]["train_steps"] == 2 and meta["world"]["split"] == "val"
    table = (out / "summary.md").read_text()
    assert "| memory | few-step |" in table and "| copy-retained | retained frame |" in table
    assert (out / "strip.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "memory few-step: PSNR" in printed and "baseline few-step: PSNR" in printed
    assert "copy-retained retained frame: PSNR" in printed


def test_reconstruction_does_not_depend_on_the_batch(models):
    """Per-clip noise seeds: a clip's reconstruction is the same alone or in a batch."""
    from mag.memory import load_memory_model

    model, preset, _ = load_memory_model(models[0])
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    x0 = torch.randn(2, 6, 3, 16, 16)
    empty = torch.randn(1, 1, preset.dit.text_dim)
    both = reconstruct(model, scheduler, x0, empty, 3, [5, 9])
    alone = reconstruct(model, scheduler, x0[1:], empty, 3, [9])
    for row in both:
        torch.testing.assert_close(both[row][1:], alone[row], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[FEW_STEP][0], both[FEW_STEP][1])


def test_wrong_stage_and_mismatched_models_are_one_line_errors(tmp_path, models, capsys):
    memory, causal = models
    other = trained_model_file(tmp_path, "causal_fm", "other", "causal", overrides={"dit.num_layers": 1})
    common = ("--episodes", "1", "--out", str(tmp_path / "o"))
    assert _run("--memory-model", str(causal), *common) == 2
    assert _run("--memory-model", str(memory), "--baseline-model", str(memory), *common) == 2
    assert _run("--memory-model", str(memory), "--baseline-model", str(other), *common) == 2
    assert _run("--memory-model", str(memory), "--clip-frames", "2", *common) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("mag: error: ") for line in lines)
    assert "holds a 'causal' model but a memory model is expected" in lines[0]
    assert "holds a 'memory' model but a teacher / causal / dmd / mag-generator model" in lines[1]
    assert "does not match the generator" in lines[2] and "num_layers" in lines[2]
    assert "no whole block" in lines[3]


def test_clip_length_is_whole_blocks_within_the_episodes():
    class Ep:
        def __init__(self, frames: int) -> None:
            self.frames = torch.zeros(frames)

    episodes = [Ep(20), Ep(14)]
    assert clip_length(episodes, 3, 4096) == 12
    assert clip_length(episodes, 3, 8) == 6
    assert clip_length(episodes, 3, 4096, requested=7) == 6
    with pytest.raises(ConfigError, match="longer than the shortest episode"):
        clip_length(episodes, 3, 4096, requested=15)
