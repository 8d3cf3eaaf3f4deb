"""``mag bench memory``: memory reconstruction on held-out clips, end to end, and its input
errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_OVERRIDES, random_dit, trained_model_file

from mag.bench.memory_recon import (
    FEW_STEP,
    TARGET_PSNR_DB,
    clip_length,
    one_step_label,
    reconstruct,
)
from mag.cache import KVCache, MagPolicy
from mag.cli import main
from mag.config import get_preset
from mag.errors import ConfigError
from mag.memory import MemoryWriter
from mag.schedulers import FlowMatchScheduler

EPISODES = 2
# A small random memory model for the reference and invariance tests: 8x8 latent frames in 2x2
# patches (16 tokens per frame), blocks of 3 frames, 3 blocks.
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "dit.text_dim": 16,
         "dit.freq_dim": 16, "dit.rope_max_positions": 64, "video.height": 8, "video.width": 8}
F, BLOCKS, BATCH = 3, 3, 2
SEEDS = [11, 12]
# Streaming vs one masked parallel pass, relative to the output's largest value: float32 sums in
# another order (measured about 1e-6); letting a noisy block see its own clean block moves outputs
# by over 1e-1.
STREAM_RELATIVE = 1e-5
# Invariance: both runs have the same shapes and kernels and a masked key weighs exactly 0, so the
# outputs agree bit for bit on CPU; this bound only leaves room for another backend's reduction
# order.
INVARIANT_RELATIVE = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(memory model file, generator model file)``: 2 training steps each, the tiny test
    network."""
    root = tmp_path_factory.mktemp("models")
    with pytest.warns(UserWarning, match="without init.model"):
        memory = trained_model_file(root / "memory", "memory", "test-memory", "memory")
    return memory, trained_model_file(root / "causal", "causal_fm", "test-causal", "causal")


def _run(*args: str) -> int:
    return main(["bench", "memory", "--no-progress", "--no-lpips", *args])


def test_cli_writes_json_table_and_strip(tmp_path, models, capsys):
    memory, causal = models
    out = tmp_path / "recon"
    assert _run("--memory-model", str(memory), "--baseline-model", str(causal), "--episodes",
                str(EPISODES), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    levels = FlowMatchScheduler(get_preset("tiny",
                                           **TINY_OVERRIDES).scheduler).few_step_timesteps().tolist()
    assert (
        summary["levels"] == pytest.approx(levels) and summary["target_psnr_db"] == TARGET_PSNR_DB
    )
    # the recipe's clip length
    assert summary["clip_frames"] == 6 and summary["frames_per_block"] == 3
    assert len(summary["episodes"]) == EPISODES
    assert set(summary["models"]) == {"memory", "baseline"}
    assert set(summary["references"]) == {"codec", "copy-retained"}
    for name in ("memory", "baseline"):
        rows = summary["models"][name]
        assert list(rows) == [one_step_label(level) for level in levels] + [FEW_STEP]
        for row in rows.values():
            # --no-lpips
            assert 0 < row["psnr"] < 60 and row["ssim"] is not None and row["lpips"] is None
            assert row["frames"] == EPISODES * 6 and row["non_retained"]["frames"] == EPISODES * 4
            assert (
                row["retained"]["frames"] == EPISODES * 2
                and len(row["per_episode_psnr"]) == EPISODES
            )
    # Different weights, same noise: different reconstructions. The pixel codec's round trip is
    # exact; copying the retained frame is exact on retained frames only.
    assert (
        summary["models"]["memory"][FEW_STEP]["psnr"]
        != summary["models"]["baseline"][FEW_STEP]["psnr"]
    )
    assert summary["references"]["codec"]["round trip"]["psnr"] == 100.0
    copy = summary["references"]["copy-retained"]["retained frame"]
    assert copy["retained"]["psnr"] == 100.0 and copy["non_retained"]["psnr"] < 60
    meta = summary["metadata"]
    assert (
        meta["models"]["memory"]["stage"] == "memory"
        and meta["models"]["baseline"]["stage"] == "causal"
    )
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
    other = trained_model_file(tmp_path, "causal_fm", "other", "causal",
                               overrides={"dit.num_layers": 1})
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


def _small(layers: int = 2):
    preset = get_preset("tiny", **{**SMALL, "dit.num_layers": layers})
    model = random_dit(preset.dit, seed=4)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    gen = torch.Generator().manual_seed(5)
    shape = (BATCH, F * BLOCKS, preset.video.latent_channels, preset.video.height,
             preset.video.width)
    x0 = torch.randn(shape, generator=gen)
    empty = torch.randn(1, 2, preset.dit.text_dim, generator=gen)
    return preset, model, scheduler, x0, empty


def _streamed_reconstruction(preset, model, scheduler, x0, empty) -> dict[str, torch.Tensor]:
    """An independent reference for :func:`reconstruct`: the MAG streaming path. Each clean block is
    written into a ``mag`` cache by :class:`MemoryWriter` (which keeps its last frame's K/V), then
    the block is denoised reading only that cache, exactly as the generator would. Noise follows the
    documented contract: per clip, ``randn([levels, N, C, H, W])`` from a generator seeded with the
    clip's seed."""
    levels = scheduler.few_step_timesteps().tolist()
    noise = torch.stack([torch.randn((len(levels), *x0.shape[1:]),
                                     generator=torch.Generator().manual_seed(s))
                         for s in SEEDS], 1)
    writer = MemoryWriter(model, empty)
    cache = KVCache.for_model(preset.dit, MagPolicy(), tokens_per_frame=preset.tokens_per_frame,
                              horizon_frames=x0.shape[1], frames_per_block=F, batch_size=BATCH)
    context = empty.expand(BATCH, -1, -1)
    rows: dict[str, list[torch.Tensor]] = {one_step_label(level): [] for level in levels} | {
        FEW_STEP: []
    }

    def predict(x_t, level, positions):
        t = torch.full((BATCH, F), level)
        return scheduler.to_x0(model(x_t, t, context, frame_positions=positions, kv_cache=cache),
                               x_t, t)

    with torch.no_grad():
        for b in range(BLOCKS):
            block, positions = slice(b * F, (b + 1) * F), torch.arange(b * F, (b + 1) * F)
            writer.write(cache, x0[:, block], positions)
            for level in levels:
                x_t = scheduler.add_noise(x0[:, block], noise[0][:, block], torch.full((BATCH, F),
                                                                                       level))
                rows[one_step_label(level)].append(predict(x_t, level, positions))
            x = noise[0][:, block]
            for step, level in enumerate(levels):
                x = predict(x, level, positions)
                if step + 1 < len(levels):
                    x = scheduler.add_noise(x, noise[step + 1][:, block],
                                            torch.full((BATCH, F), levels[step + 1]))
            rows[FEW_STEP].append(x)
    assert cache.num_valid_frames == BLOCKS  # one compressed frame per block, nothing else
    return {row: torch.cat(parts, 1) for row, parts in rows.items()}


def test_reconstruction_equals_an_independent_streaming_reference():
    preset, model, scheduler, x0, empty = _small()
    rows = reconstruct(model, scheduler, x0, empty, F, SEEDS)
    reference = _streamed_reconstruction(preset, model, scheduler, x0, empty)
    assert rows.keys() == reference.keys()
    for row, expected in reference.items():
        scale = expected.abs().max()
        assert (rows[row] - expected).abs().max() <= STREAM_RELATIVE * scale, row


def _replace_non_retained(x0: torch.Tensor, seed: int) -> torch.Tensor:
    other = x0.clone()
    non_retained = [f for f in range(x0.shape[1]) if f % F != F - 1]
    gen = torch.Generator().manual_seed(seed)
    other[:, non_retained] = torch.randn(other[:, non_retained].shape, generator=gen)
    return other


def test_reconstruction_ignores_non_retained_clean_frames_in_a_one_layer_model():
    """Only the retained frame's K/V may carry a block into its reconstruction. In a one-layer model
    a frame's K/V are a function of that frame alone, so the few-step reconstruction (which starts
    from pure noise, not from the input) must not change when every non-retained clean frame changes
    -- and must change when the retained ones do (the check can fail)."""
    _, model, scheduler, x0, empty = _small(layers=1)
    rows = reconstruct(model, scheduler, x0, empty, F, SEEDS)
    other = reconstruct(model, scheduler, _replace_non_retained(x0, seed=6), empty, F, SEEDS)
    assert (other[FEW_STEP] - rows[FEW_STEP]).abs().max() <= INVARIANT_RELATIVE * rows[
        FEW_STEP
    ].abs().max()
    retained_changed = x0.clone()
    retained_changed[:, F - 1::F] += 1.0
    moved = reconstruct(model, scheduler, retained_changed, empty, F, SEEDS)[FEW_STEP]
    assert (moved - rows[FEW_STEP]).abs().max() > 1e-2


def test_streaming_write_pass_ignores_non_retained_clean_frames_in_a_one_layer_model():
    """The same invariance through the streaming write pass: the ``mag`` cache may keep nothing of a
    block but its last frame's K/V."""
    preset, model, scheduler, x0, empty = _small(layers=1)
    rows = _streamed_reconstruction(preset, model, scheduler, x0, empty)
    other = _streamed_reconstruction(preset, model, scheduler, _replace_non_retained(x0, seed=6),
                                     empty)
    assert (other[FEW_STEP] - rows[FEW_STEP]).abs().max() <= INVARIANT_RELATIVE * rows[
        FEW_STEP
    ].abs().max()
