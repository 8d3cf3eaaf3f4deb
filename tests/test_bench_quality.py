"""``mag bench quality``: JSON contract end to end on tiny models of each stage, and its input
errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import CAMERA, trained_model_file

from mag.bench.metrics import frechet_alexnet_distance
from mag.bench.quality import (
    REAL_VS_REAL,
    feature_images,
    parse_sampler_spec,
    real_clips,
    sampler_for_stage,
    score_set,
)
from mag.bench.quality_cli import run_quality_cli
from mag.cli import build_parser, main
from mag.errors import CheckpointError, ConfigError
from mag.pipelines import SamplerConfig
from mag.world import get_world_config

CLIPS = 2
FRAMES = 6
TEACHER_STEPS = 8  # the smallest Euler grid that holds the tiny preset's few-step levels


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Camera-anchored model files of every stage the benchmark samples, plus a memory model (2
    steps)."""
    root = tmp_path_factory.mktemp("models")
    files = {stage: trained_model_file(root / stage, kind, f"test-{stage}", stage, overrides=CAMERA)
             for stage, kind in (("teacher", "teacher_fm"), ("causal", "causal_fm"), ("dmd",
                                                                                      "causal_fm"))}
    with pytest.warns(UserWarning, match="without init.model"):
        files["memory"] = trained_model_file(root / "memory", "memory", "test-memory", "memory",
                                             overrides=CAMERA)
    return files


def _run(*args: str) -> int:
    return main(["bench", "quality", "--no-progress", "--clips", str(CLIPS), "--frames",
                 str(FRAMES), "--steps", str(TEACHER_STEPS), *args])


def test_cli_writes_summary_table_and_grid(tmp_path, models, capsys):
    out = tmp_path / "quality"
    names = ",".join(str(models[stage]) for stage in ("teacher", "causal", "dmd"))
    assert _run("--models", names, "--sampler-for", f"{models['causal']}=euler:2", "--out",
                str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == CLIPS and summary["frames"] == FRAMES and summary["split"] == "val"
    assert list(summary["models"]) == ["test-teacher", "test-causal", "test-dmd"]
    assert list(summary["references"]) == [REAL_VS_REAL]
    expected = {"test-teacher": ("teacher", "euler", TEACHER_STEPS), "test-causal": ("causal",
                                                                                     "euler", 2),
                "test-dmd": ("dmd", "few_step", 4)}
    for name, row in {**summary["models"], **summary["references"]}.items():
        assert math.isfinite(row["fd"]) and row["fd"] >= 0
        assert 0 < row["psnr"] < 60 and -1 <= row["ssim"] <= 1
        assert row["samples"] == CLIPS and row["frames"] == CLIPS * FRAMES
        if name in expected:
            assert (row["stage"], row["sampler"], row["steps"]) == expected[name]
            assert row["seconds"] >= 0 and row["model"]["world_matches_training"]
    # the DMD recipe's, by default
    assert summary["models"]["test-teacher"]["guidance_scale"] == 4.0
    assert summary["models"]["test-teacher"]["mode"] == "bidirectional"
    assert summary["models"]["test-dmd"]["mode"].startswith("streaming")
    # Different weights and samplers give different samples, hence different distances.
    assert len({row["fd"] for row in summary["models"].values()}) == 3
    assert summary["real_vs_real_indices"] == [CLIPS, 2 * CLIPS]
    assert summary["metadata"]["world"]["source"] == "test-teacher recipe.data.world"
    table = (out / "summary.md").read_text()
    assert "| test-dmd | dmd | few_step | 4 |" in table and f"| {REAL_VS_REAL} |" in table
    assert (out / "samples.png").stat().st_size > 0
    assert "test-teacher: FD" in capsys.readouterr().out


def test_teacher_samples_do_not_depend_on_the_batch(models):
    """Per-clip noise: the teacher's sample of a clip is the same alone or in a batch."""
    from mag.bench.quality import sample_model
    from mag.registry import load_model
    from mag.text import prompt_cache
    from mag.train.data import preset_world

    model, preset, meta = load_model(models["teacher"])
    clips = real_clips(preset_world(preset, meta["recipe"]["data"]["world"]), "val", 0, CLIPS,
                       FRAMES)
    text = prompt_cache(preset.text_encoder, "pooled")
    sampler = SamplerConfig("euler", TEACHER_STEPS, 4.0)
    together = sample_model(model, preset, "teacher", sampler, clips, text.get, batch_size=CLIPS)
    alone = sample_model(model, preset, "teacher", sampler, clips, text.get, batch_size=1)
    np.testing.assert_array_equal(together, alone)
    assert together.shape == (CLIPS, FRAMES, preset.video.height, preset.video.width, 3)


def test_score_set_matches_frechet_alexnet_distance_and_zero_on_itself():
    world = get_world_config("default", frame_height=16, frame_width=16, pano_height=16,
                             block_frames=3)
    a = real_clips(world, "val", 0, 3, FRAMES).frames
    b = real_clips(world, "val", 3, 3, FRAMES).frames
    scores = score_set(b, a)
    direct = frechet_alexnet_distance(feature_images(b), feature_images(a))
    assert scores["fd"] == pytest.approx(float(direct))
    assert scores["fd"] > 0
    same = score_set(a, a)
    # every frame identical
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and same["psnr"] is None
    assert same["psnr_identical_frames"] == 3 * FRAMES and same["ssim"] == pytest.approx(1.0)
    assert feature_images(a).shape == (3 * FRAMES, 3, 64, 64)


def test_real_vs_real_sets_are_disjoint_worlds():
    world = get_world_config("default", frame_height=16, frame_width=16, pano_height=16,
                             block_frames=3)
    first, second = real_clips(world, "val", 0, 2, FRAMES), real_clips(world, "val", 2, 2, FRAMES)
    assert first.indices == [0, 1] and second.indices == [2, 3]
    assert not np.array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(first.frames, real_clips(world, "val", 0, 2, FRAMES).frames)


def test_sampler_specs_and_stage_rules():
    assert parse_sampler_spec("euler:8") == SamplerConfig("euler", 8, 1.0)
    assert parse_sampler_spec("euler:48:4") == SamplerConfig("euler", 48, 4.0)
    assert parse_sampler_spec("few_step") == SamplerConfig("few_step", 0, 1.0)
    for bad in ("heun:4", "euler", "euler:x", "euler:4:1:2"):
        with pytest.raises(ConfigError):
            parse_sampler_spec(bad)
    teacher, stream = SamplerConfig("euler", 48, 4.0), SamplerConfig()
    assert sampler_for_stage("teacher", None, teacher, stream) == teacher
    assert sampler_for_stage("dmd", None, teacher, stream) == stream
    with pytest.raises(ConfigError, match="bidirectionally with Euler"):
        sampler_for_stage("teacher", SamplerConfig(), teacher, stream)
    with pytest.raises(ConfigError, match="stage 'memory'"):
        sampler_for_stage("memory", None, teacher, stream)


def _error(capsys, *args: str) -> str:
    """Run the command, which must fail with one ``mag: error:`` line and no traceback; return the
    line."""
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mag: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_model_name_and_memory_model_are_one_clear_error(tmp_path, models, capsys):
    err = _error(capsys, "--models", "no-such-model", "--out", str(tmp_path / "a"))
    assert "no model named or at 'no-such-model'; shipped models: " in err and "tiny-dmd" in err
    err = _error(capsys, "--models", str(models["memory"]), "--out", str(tmp_path / "b"))
    assert (
        "holds a 'memory' model but a teacher / causal / dmd / mag-generator model is expected"
        in err
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the library raises the same error
    with pytest.raises(CheckpointError, match="holds a 'memory' model"):
        run_quality_cli(build_parser().parse_args(
            ["bench", "quality", "--models", str(models["memory"]), "--out", str(tmp_path / "c")]))


def test_input_errors_before_sampling(tmp_path, models, capsys):
    teacher = str(models["teacher"])
    out = tmp_path / "never"
    assert "at least 2" in _error(capsys, "--models", teacher, "--clips", "1", "--out", str(out))
    assert "multiple of the block size" in _error(capsys, "--models", teacher, "--frames", "4",
                                                  "--out", str(out))
    assert "listed twice" in _error(capsys, "--models", f"{teacher},{teacher}", "--out", str(out))
    assert "--sampler-for names other" in _error(capsys, "--models", teacher, "--sampler-for",
                                                 "other=euler:4", "--out", str(out))
    assert "do not land on the few-step levels" in _error(capsys, "--models", teacher, "--steps",
                                                          "6", "--out", str(out))
    assert "bidirectionally with Euler" in _error(capsys, "--models", teacher, "--sampler-for",
                                                  f"{teacher}=few_step", "--out", str(out))
    assert not out.exists()
