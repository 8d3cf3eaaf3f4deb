"""The consistency benchmark: protocol pieces, the CLI contract end to end, real-video input,
errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mag.bench.consistency import (
    PSNR_CAP_DB,
    BenchEpisode,
    ConsistencyResult,
    RowScores,
    bench_world,
    episode_summary,
    gap_bin_labels,
    revisit_summary,
    score_pairs,
    video_episodes,
    within_window,
    world_episodes,
)
from mag.checkpoint import TrainingState, save_checkpoint
from mag.cli import build_parser, main
from mag.config import get_preset
from mag.errors import ConfigError, InputError
from mag.io.video import write_mp4
from mag.models import WanDiT
from mag.registry import export_model
from mag.world import make_episode

# 16x16 frames (4 x 4 patches = 16 tokens), a 2-layer 32-wide DiT; MiniLM pooled text (384-d).
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "video.height": 16, "video.width": 16}
# The training world stored in the checkpoint: short excursions so two episodes stream in seconds.
TRAIN_WORLD = {"pano_width": 96, "speed_range_px": [4, 4], "speed_quantum_px": 4,
               "excursion_frames_range": [6, 9], "pause_frames_range": [0, 1], "legs_range": [3, 5],
               "episode_frames": 30}


@pytest.fixture(scope="module")
def preset():
    return get_preset("tiny", **SMALL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, preset):
    torch.manual_seed(0)
    model = WanDiT(preset.dit)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    recipe = {"name": "test-recipe", "data": {"world": TRAIN_WORLD, "text_mode": "pooled"}}
    state = TrainingState(step=3, model=model.state_dict(), ema=None, optimizer=None, rng={},
                          metadata={"preset": preset.to_dict(), "recipe": recipe,
                                    "kind": "training"},
                          extra={})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), state)


def _model_file(root, preset, seed: int, stage: str, recipe: dict | None = None):
    """A random-weights model file of ``stage`` (exported like a shipped model)."""
    torch.manual_seed(seed)
    model = WanDiT(preset.dit)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    recipe = recipe or {"name": f"test-{stage}", "data": {"world": TRAIN_WORLD,
                                                          "text_mode": "pooled"}}
    state = TrainingState(step=5, model=model.state_dict(), ema=None, optimizer=None, rng={},
                          metadata={"preset": preset.to_dict(), "recipe": recipe,
                                    "kind": "training", "commit": "abc123"}, extra={})
    checkpoint = save_checkpoint(root / f"ckpt-{stage}", state)
    return export_model(checkpoint, root / f"{stage}.safetensors", name=f"test-{stage}",
                        stage=stage)


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory, preset):
    """A stage-1 memory model file of the generator's preset, random weights."""
    return _model_file(tmp_path_factory.mktemp("memory"), preset, seed=1, stage="memory")


def _run(*args: str) -> int:
    return main(["bench", "consistency", "--no-progress", *args])


# ---------------------------------------------------------------------------------------------
# Protocol pieces


def test_within_window_is_the_window_policy_visibility(preset):
    cache = preset.cache  # sink 3, window 9, blocks of 3
    frames = np.array([30, 30, 31, 32, 30, 30])
    seen = np.array([21, 20, 20, 20, 1, -1])
    # frame 30's block starts at 30: window covers 21..29; frames 31/32 share the block; sinks 0..2.
    assert within_window(frames, seen, cache).tolist() == [True, False, False, False, True, False]


def test_bench_world_follows_the_training_world_with_two_leg_backtracks(preset):
    world, source = bench_world(preset, training_world=TRAIN_WORLD, excursion_scale=2.0,
                                frames_after=30)
    assert source == "checkpoint recipe.data.world"
    assert (world.frame_height, world.frame_width, world.pano_height) == (16, 16, 16)
    assert world.legs_range == (2, 2)
    assert world.excursion_frames_range == (12, 18)
    assert world.pano_width == 96
    assert world.episode_frames >= 18 + 1 + 1 + 2 * 3 + 30  # longest switch + 30 generated frames
    named, named_source = bench_world(preset, name="recall-easy", training_world=TRAIN_WORLD)
    assert named_source == "--world recall-easy" and named.excursion_frames_range == (3, 12)


def test_world_episode_history_matches_show_the_same_view(preset):
    world, _ = bench_world(preset, training_world=TRAIN_WORLD)
    for ep in world_episodes(world, count=3):
        s = ep.switch_frame
        assert s % 3 == 0 and ep.num_generate % 3 == 0
        revisited = np.flatnonzero(ep.history_match >= 0)
        assert revisited.size > 0
        assert (ep.history_match[revisited] < s).all()
        # Exact revisits: the matched history frame equals the ground-truth frame.
        assert np.array_equal(ep.frames[s + revisited], ep.frames[ep.history_match[revisited]])
        assert (ep.gaps[revisited] > 0).all()


def test_identical_frames_score_the_psnr_cap_and_zero_lpips():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = 255 - b[1]
    scores = score_pairs(a, b)
    assert scores["psnr"][0] == PSNR_CAP_DB and scores["psnr"][1] < 20
    assert scores["lpips"][0] == 0.0 and scores["lpips"][1] > 0.05  # LPIPS ran on 16 px (upsampled)
    assert scores["ssim"][0] == pytest.approx(1.0)


def test_episode_psnr_averages_mse_so_identical_frames_do_not_dominate():
    frames = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    ep = BenchEpisode(name="0", frames=frames, switch_frame=3, num_generate=3, prompt="",
                      history_match=np.array([2, 1, -1]))
    psnr_db = np.array([PSNR_CAP_DB, 20.0, 30.0])  # identical, MSE 0.01, MSE 0.001
    scores = {t: {"psnr": psnr_db, "ssim": np.array([1.0, 0.5, 0.2]), "lpips": np.zeros(3)}
              for t in ("vs_gt", "vs_history")}
    within = np.array([True, False, False])
    summary = episode_summary(scores, ep, within)
    # PSNR of the mean MSE of (0, 0.01): 10 log10(1 / 0.005) = 23.01 dB, not the mean of 100 and 20.
    assert summary["vs_history"]["psnr"] == pytest.approx(-10 * np.log10(0.005), abs=1e-6)
    assert summary["vs_history"]["frames"] == 2  # only revisited frames are scored vs history
    assert summary["vs_history"]["within"]["psnr"] == PSNR_CAP_DB  # all identical: the cap
    assert summary["vs_history"]["beyond"]["psnr"] == pytest.approx(20.0)
    assert summary["vs_gt"]["unseen"]["psnr"] == pytest.approx(30.0)
    # SSIM: plain frame mean
    assert summary["vs_gt"]["ssim"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)
    assert summary["vs_history"]["by_gap"]["1-6"]["frames"] == 2  # gaps 1 and 3


# ---------------------------------------------------------------------------------------------
# End to end


def test_cli_writes_the_summary_contract(tmp_path, checkpoint, capsys):
    out = tmp_path / "bench"
    assert _run("--model", str(checkpoint), "--episodes", "2", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "autoregressive" and summary["episodes"] == 2
    assert set(summary["policies"]) == {"full", "window", "downsample"}
    assert set(summary["references"]) == {"repeat-last", "oracle-copy"}
    for row in (*summary["policies"].values(), *summary["references"].values()):
        for target in ("vs_gt", "vs_history"):
            for key in ("psnr", "ssim", "lpips"):
                assert row[target][key] is not None
                assert key in row[target]["within"] and key in row[target]["beyond"]
    oracle = summary["references"]["oracle-copy"]["vs_history"]
    assert oracle["psnr"] == PSNR_CAP_DB and oracle["lpips"] == 0.0
    for policy in summary["policies"].values():
        assert policy["vs_history"]["psnr"] < 60  # a random model does not copy
    assert summary["references"]["repeat-last"]["vs_gt"]["psnr"] < PSNR_CAP_DB
    record = json.loads((out / "episodes" / "window" / "0.json").read_text())
    assert len(record["scores"]["vs_gt"]["psnr"]) == record["num_generated"] == len(record["gap"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["world"]["source"] == "checkpoint recipe.data.world"
    assert meta["world"]["config"]["frame_height"] == 16 and meta["world"]["config"][
        "legs_range"
    ] == [2, 2]
    assert meta["preset"]["video"]["height"] == 16 and meta["model"]["recipe"] == "test-recipe"
    assert {"commit", "machine", "command"} <= set(meta)
    for name in ("summary.md", "psnr_vs_gap.png", "revisit_strip.png"):
        assert (out / name).stat().st_size > 0
    assert "| oracle-copy |" in (out / "summary.md").read_text()
    assert "oracle-copy: vs GT PSNR 100.00 dB" in capsys.readouterr().out


def test_teacher_forced_mode_runs_and_is_recorded(tmp_path, checkpoint):
    out = tmp_path / "tf"
    args = ("--model", str(checkpoint), "--episodes", "2", "--policies", "full,window",
            "--frames-after", "6", "--no-lpips", "--sampler", "euler", "--steps", "2")
    assert _run(*args, "--teacher-forced", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "teacher-forced"
    assert summary["config"]["sampler"] == {"kind": "euler", "steps": 2, "guidance_scale": 1.0}
    assert summary["policies"]["full"]["vs_gt"]["lpips"] is None  # --no-lpips
    assert summary["policies"]["full"]["vs_gt"]["frames"] == 2 * 6
    # Teacher forcing changes what the later blocks are conditioned on.
    assert _run(*args, "--out", str(tmp_path / "ar")) == 0
    ar = json.loads((tmp_path / "ar" / "summary.json").read_text())
    assert ar["mode"] == "autoregressive"
    assert ar["policies"]["full"]["vs_gt"]["psnr"] != summary["policies"]["full"]["vs_gt"]["psnr"]


def _video_folder(tmp_path, table):
    folder = tmp_path / "videos"
    folder.mkdir()
    world, _ = bench_world(get_preset("tiny", **SMALL), training_world=TRAIN_WORLD)
    for index, name in enumerate(("a.mp4", "b.mp4")):
        ep = make_episode("test", index, config=world)
        write_mp4(folder / name, ep.frames[:24], fps=8)
    (folder / "switch_times.json").write_text(table if isinstance(table,
                                                                  str) else json.dumps(table))
    return folder


def test_real_video_mode_scores_mirror_and_explicit_pairs(tmp_path, checkpoint):
    table = {"a.mp4": 12, "b.mp4": {"switch_frame": 13, "prompt": "a desert", "pairs": [[12, 2],
                                                                                        [14, 0]]}}
    folder = _video_folder(tmp_path, table)
    episodes = {ep.name: ep for ep in video_episodes(folder, get_preset("tiny", **SMALL))}
    assert episodes["a"].frames.shape[1:] == (16, 16, 3)
    assert episodes["a"].history_match.tolist() == [11 - k for k in range(12)]  # mirror 2s-1-i
    assert episodes["b"].switch_frame == 12  # rounded down to a whole block
    assert episodes["b"].history_match[:3].tolist() == [2, -1, 0]
    out = tmp_path / "real"
    assert _run("--model", str(checkpoint), "--videos", str(folder), "--policies", "window",
                "--no-lpips", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["references"]["oracle-copy"]["vs_history"]["psnr"] == PSNR_CAP_DB
    assert (out / "episodes" / "window" / "b.json").is_file()


@pytest.mark.parametrize(("table", "message"), [
    ("{not json", "not valid JSON"),
    ({"a.mp4": 40}, "shorter than its switch frame 40"),
    ({"missing.mp4": 6}, "not a file"),
    ({"a.mp4": "six"}, "must be a switch frame"),
    ({"a.mp4": {"switch_frame": 12, "pairs": [[12, 20]]}}, "history frame in"),
    ({"../videos/a.mp4": 12}, "file names inside"),  # names a file, but by a path: refused
    ({"/etc/hostname": 12}, "file names inside"),
])
def test_bad_video_folders_are_one_input_error(tmp_path, table, message):
    folder = _video_folder(tmp_path, table)
    with pytest.raises(InputError, match=message):
        video_episodes(folder, get_preset("tiny", **SMALL))


def test_cli_errors_are_one_line(tmp_path, checkpoint, capsys):
    assert _run("--videos", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    assert _run("--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")) == 2
    assert _run("--model", str(checkpoint), "--policies", "mag", "--out", str(tmp_path / "o")) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run("--model", str(checkpoint), "--videos", str(empty), "--out",
                str(tmp_path / "o")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("mag: error: ") for line in lines)
    assert "not a folder" in lines[0] and "missing.safetensors" in lines[1]
    assert "memory model" in lines[2] and "switch_times.json" in lines[3]


# ---------------------------------------------------------------------------------------------
# Memory-model policies


@pytest.mark.parametrize("mode", [(), ("--teacher-forced",)], ids=["autoregressive",
                                                                   "teacher-forced"])
def test_memory_model_enables_mag_and_bounded(tmp_path, checkpoint, memory_file, mode):
    out = tmp_path / "mem"
    assert _run("--model", str(checkpoint), "--memory-model", str(memory_file), "--episodes", "2",
                "--policies", "full,window,downsample,mag,bounded", "--frames-after", "6",
                "--no-lpips", *mode, "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == ("teacher-forced" if mode else "autoregressive")
    assert set(summary["policies"]) == {"full", "window", "downsample", "mag", "bounded"}
    rows = summary["policies"]
    for name in ("mag", "bounded"):
        assert rows[name]["vs_gt"]["frames"] == 2 * 6 and rows[name]["vs_gt"]["psnr"] is not None
    # mag keeps downsample's frames but the memory model writes them: other K/V, other frames.
    assert rows["mag"]["vs_gt"]["psnr"] != rows["downsample"]["vs_gt"]["psnr"]
    memory = summary["metadata"]["memory_model"]
    assert memory == {"path": str(memory_file), "name": "test-memory", "stage": "memory",
                      "recipe": "test-memory", "train_steps": 5, "commit": "abc123", "note": None}


def test_memory_model_errors_are_clear(tmp_path, checkpoint, memory_file, preset, capsys):
    smaller = get_preset("tiny", **{**SMALL, "dit.num_layers": 1})
    other = _model_file(tmp_path, smaller, seed=2, stage="memory")
    causal = _model_file(tmp_path, preset, seed=3, stage="causal")
    common = ("--episodes", "1", "--no-lpips", "--out", str(tmp_path / "o"))
    assert _run("--model", str(checkpoint), "--memory-model", str(causal), "--policies", "mag",
                *common) == 2
    assert _run("--model", str(memory_file), "--policies", "full", *common) == 2
    assert _run("--model", str(checkpoint), "--memory-model", str(other), "--policies", "mag",
                *common) == 2
    assert _run("--model", str(checkpoint), "--policies", "window,bounded", *common) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("mag: error: ") for line in lines)
    assert "holds a 'causal' model but a memory model is expected" in lines[0]
    assert "holds a 'memory' model but a teacher / causal / dmd / mag-generator model" in lines[1]
    assert "does not match the generator" in lines[2] and "num_layers: 2 vs 1" in lines[2]
    assert "policy 'bounded' needs a trained MAG memory model: pass --memory-model" in lines[3]


def test_memory_slots_make_bounded_forget_and_empty_prompt_changes_generation(tmp_path, checkpoint,
                                                                              memory_file):
    """--memory-slots 1: the bounded ring keeps one compressed frame, so it differs from unbounded
    mag; --empty-prompt-after-switch: generation reads the empty prompt, so frames change (history
    does not); --memory-sink-frames 0: the first block is compressed too, so mag changes and the run
    records it."""
    common = ("--model", str(checkpoint), "--memory-model", str(memory_file), "--episodes", "2",
              "--frames-after", "9", "--no-lpips")
    runs = {}
    for name, extra in {"base": (), "slots": ("--memory-slots", "1"),
                        "sinks": ("--memory-sink-frames", "0"),
                        "empty": ("--empty-prompt-after-switch",)}.items():
        assert _run(*common, "--policies", "mag,bounded", *extra, "--out",
                    str(tmp_path / name)) == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())["policies"]
    psnr = {name: {p: rows[p]["vs_gt"]["psnr"] for p in rows} for name, rows in runs.items()}
    assert psnr["base"]["mag"] == psnr["base"]["bounded"]        # 64 slots: nothing evicted yet
    # mag is unbounded whatever the slots
    assert psnr["slots"]["mag"] == psnr["base"]["mag"]
    assert psnr["slots"]["bounded"] != psnr["slots"]["mag"]      # one slot: older blocks are gone
    assert psnr["empty"]["mag"] != psnr["base"]["mag"]
    assert psnr["sinks"]["mag"] != psnr["base"]["mag"]
    metadata = json.loads((tmp_path / "sinks" / "summary.json").read_text())["metadata"]
    assert metadata["preset"]["cache"]["memory_sink_frames"] == 0
    assert _run(*common, "--policies", "bounded", "--memory-slots", "0", "--out",
                str(tmp_path / "bad")) == 2


def test_every_flag_the_benchmark_doc_lists_for_consistency_exists_in_the_command():
    """The options paragraph of docs/benchmark.md's opening names real flags, the memory model's
    included (it once said the CLI could not pass one)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmark.md").read_text()
    options = doc[doc.index("Options: `--policies"):].split("\n\n")[0]
    named = set(re.findall(r"`(--[a-z-]+)", options))
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in sub.choices["bench"]._actions
                 if isinstance(a, argparse._SubParsersAction)).choices["consistency"]
    flags = {s for a in bench._actions for s in a.option_strings}
    assert {"--memory-model", "--memory-weights", "--dtype"} <= named
    assert named <= flags, named - flags


# ---------------------------------------------------------------------------------------------
# Loop episodes and long gaps


def test_gap_bins_reach_500_and_bin_long_gaps():
    assert gap_bin_labels() == ["1-6", "7-12", "13-18", "19-24", "25-36", "37-48", "49-72",
                                "73-96", "97-150", "151-200", "201-300", "301-400", "401-500",
                                ">500"]
    ep = BenchEpisode(name="0", frames=np.zeros((606, 4, 4, 3), np.uint8), switch_frame=600,
                      num_generate=6, prompt="", history_match=np.array([600 - 96, 600 - 97 + 1,
                                                                         401, 100, 99, -1]))
    scores = {t: {m: np.full(6, 30.0) for m in ("psnr", "ssim", "lpips")}
              for t in ("vs_gt", "vs_history")}
    by_gap = episode_summary(scores, ep, np.zeros(6, bool))["vs_gt"]["by_gap"]
    # gaps 96, 97, 201, 503, 505 (and one unseen frame)
    assert {label: by_gap[label]["frames"] for label in by_gap if by_gap[label]["frames"]} == {
        "73-96": 1, "97-150": 1, "201-300": 1, ">500": 2}


def _fake_result(gaps: list[list[int]], psnr_db: list[list[float]],
                 within: list[list[bool]]) -> tuple[RowScores, ConsistencyResult]:
    """A result with one row whose frames have these gaps, PSNRs vs GT and within flags."""
    episodes, frames = [], []
    for ep_gaps, ep_psnr in zip(gaps, psnr_db, strict=True):
        n, s = len(ep_gaps), 600
        match = np.array([s + i - g if g > 0 else -1 for i, g in enumerate(ep_gaps)])
        episodes.append(BenchEpisode(name=str(len(episodes)), frames=np.zeros((s + n, 4, 4, 3),
                                                                               np.uint8),
                                     switch_frame=s, num_generate=n, prompt="",
                                     history_match=match))
        values = np.asarray(ep_psnr, dtype=float)
        frames.append({t: {"psnr": values, "ssim": values, "lpips": values}
                       for t in ("vs_gt", "vs_history")})
    row = RowScores("full", frames)
    result = ConsistencyResult(episodes, {"full": row}, {}, [np.asarray(w) for w in within], 0, {})
    return row, result


def test_revisit_summary_pools_beyond_window_frames_by_gap_range():
    row, result = _fake_result(
        gaps=[[20, 10, 120, 500, 501], [24, 97, -1]],
        psnr_db=[[20.0, 50.0, 30.0, 10.0, 5.0], [30.0, 20.0, 40.0]],
        within=[[False, True, False, False, False], [False, False, False]])
    summary = revisit_summary(row, result)
    # gap <= 24 beyond the window: 20 dB (MSE 0.01) and 30 dB (0.001), pooled over both episodes;
    # the within-window frame (gap 10) and the unseen one are left out.
    assert summary["gap_1_24"]["frames"] == 2 and summary["gap_1_24"]["episodes"] == 2
    assert summary["gap_1_24"]["psnr"] == pytest.approx(-10 * np.log10(0.0055))
    # 97..500 inclusive: gaps 120, 500 and 97 (not 501)
    assert summary["gap_97_500"]["frames"] == 3
    assert summary["gap_97_500"]["psnr"] == pytest.approx(-10 * np.log10((1e-3 + 0.1 + 0.01) / 3))


def test_loop_episodes_give_every_generated_frame_a_gap_in_both_modes(preset):
    world, source = bench_world(preset, name="loop-600")
    assert source == "--world loop-600" and world.trajectory == "loop" and world.frame_width == 16
    free = world_episodes(world, count=2)
    forced = world_episodes(world, count=2, teacher_forced=True)
    for ar, tf in zip(free, forced, strict=True):
        s, block = ar.switch_frame, 3
        assert s == tf.switch_frame == 558 and ar.num_generate == 42
        assert (ar.history_match >= 0).all() and (tf.history_match >= 0).all()
        assert (ar.history_match < s).all()
        assert (tf.history_match < ar.frame_indices // block * block).all()
        # Both match exact revisits: the matched frame is the ground truth.
        for match in (ar.history_match, tf.history_match):
            assert np.array_equal(ar.frames[ar.frame_indices], ar.frames[match])
        # Short gaps in B near the switch, long ones on the return to A.
        for gaps in (ar.gaps, tf.gaps):
            assert ((gaps > 12) & (gaps <= 24)).sum() >= 6
            assert ((gaps >= 97) & (gaps <= 500)).sum() >= 15
        # They differ where B's last sweep comes back over views generated since the switch: the
        # true frames are closer than the history.
        differ = ar.history_match != tf.history_match
        assert differ.sum() >= 10 and (ar.gaps[differ] > tf.gaps[differ]).all()
        assert tf.gaps[:26].max() == 24 and ar.gaps[:26].max() > 24
    # Backtracks never repeat a view after the switch: both modes match the same history frames.
    backtrack, _ = bench_world(preset, training_world=TRAIN_WORLD)
    for ar, tf in zip(world_episodes(backtrack, count=3),
                      world_episodes(backtrack, count=3, teacher_forced=True), strict=True):
        assert np.array_equal(ar.history_match, tf.history_match)
    with pytest.raises(ConfigError, match="--excursion-scale scales backtrack"):
        bench_world(preset, name="loop-600", excursion_scale=2.0)


def test_cli_loop_run_reports_short_and_long_gap_revisits(tmp_path, checkpoint, capsys):
    out = tmp_path / "loop"
    assert _run("--model", str(checkpoint), "--world", "loop-600", "--episodes", "2",
                "--policies", "full,window", "--no-lpips", "--sampler", "euler", "--steps", "1",
                "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["revisit_gap_ranges"] == {"gap_1_24": [1, 24], "gap_97_500": [97, 500]}
    assert summary["gap_bins"][-1] == ">500"
    for name in ("full", "window"):
        revisits = summary["policies"][name]["revisits"]
        assert revisits["gap_1_24"]["frames"] > 0 and revisits["gap_97_500"]["frames"] >= 30
        assert revisits["gap_97_500"]["psnr"] < 60  # an untrained model does not recall
    oracle = summary["references"]["oracle-copy"]["revisits"]["gap_97_500"]
    assert oracle["psnr"] == PSNR_CAP_DB and oracle["episodes"] == 2
    long_bins = [label for label in summary["gap_bins"][8:]
                 if summary["policies"]["full"]["vs_gt"]["by_gap"][label]["frames"]]
    assert len(long_bins) >= 2
    assert (out / "psnr_vs_gap.png").stat().st_size > 0
    assert "| full | " in (out / "summary.md").read_text().split("Beyond-window revisits")[1]
    assert "gap 97-500" in capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["world"]["config"]["trajectory"] == "loop"
