"""``mag demo``: the files it writes, same-noise determinism, the panel layout, and one-line errors.

Runs on tiny model files trained for 2 steps (tests/helpers.py), camera-anchored like the shipped
ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import CAMERA, trained_model_file

from mag.app import DEFAULTS, DemoConfig, load_models
from mag.cli import main
from mag.demo import (
    DEMO_POLICIES,
    LABEL_BAND_PX,
    LONG_MEMORY_MODEL,
    LONG_MODEL,
    LONG_POLICIES,
    PANEL_GAP_PX,
    STATUS_BAND_PX,
    compose_panels,
    revisit_columns,
    revisit_psnr,
    run_demo,
)
from mag.io.video import read_mp4
from mag.registry import shipped_models

# The stand-in memory model starts from random weights (plumbing only); its trainer warns about
# that.
pytestmark = pytest.mark.filterwarnings("ignore:recipe .test-mem:UserWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> DemoConfig:
    """A camera-anchored generator and memory model (2 training steps each) as a DemoConfig."""
    root = tmp_path_factory.mktemp("demo-models")
    generator = trained_model_file(root / "gen", "causal_fm", "test-gen", "causal", CAMERA)
    memory = trained_model_file(root / "mem", "memory", "test-mem", "memory", CAMERA)
    return DemoConfig(model=str(generator), memory_model=str(memory), sampler="euler", steps=2)


def _cli(config: DemoConfig, out: Path, *extra: str) -> int:
    return main(["demo", "-o", str(out), "--model", config.model, "--memory-model",
                 config.memory_model,
                 "--sampler", config.sampler, "--steps", str(config.steps), "--no-progress",
                 *extra])


def test_defaults_name_shipped_models():
    shipped = shipped_models()
    assert DEFAULTS.model in shipped and shipped[DEFAULTS.model].stage != "memory"
    assert shipped[DEFAULTS.memory_model].stage == "memory"


def test_long_demo_defaults_name_shipped_models():
    shipped = shipped_models()
    assert LONG_MODEL in shipped and shipped[LONG_MODEL].stage == "causal"
    assert shipped[LONG_MEMORY_MODEL].stage == "memory"


def test_long_demo_returns_hundreds_of_frames_later(models, tmp_path, capsys):
    assert _cli(models, tmp_path / "out", "--long") == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert list(record["policies"]) == list(LONG_POLICIES)
    assert "MAG archive: revisit PSNR" in printed
    episode = record["episode"]
    assert episode["total_frames"] == 600
    # The return to A: views last seen before the dwell in B, far beyond the window.
    beyond = episode["beyond_window_frames"]
    assert len(beyond) > 0 and beyond[-1] == episode["total_frames"] - 1
    video = read_mp4(tmp_path / "out" / "demo.mp4")
    assert video.shape[0] == episode["total_frames"]


def test_demo_writes_video_strip_and_json(models, tmp_path, capsys):
    assert _cli(models, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "demo.json").read_text())
    episode = record["episode"]
    assert set(record["policies"]) == set(DEMO_POLICIES)
    for name in DEMO_POLICIES:
        psnr = record["policies"][name]["revisit_psnr_db"]
        assert psnr["all"] is not None and 0 < psnr["all"] <= 100
        shown = "-" if psnr["beyond"] is None else f"{psnr['beyond']:.2f} dB"
        assert f"revisit PSNR {shown} beyond the window" in printed
    assert record["models"]["generator"]["path"] == models.model
    assert record["models"]["memory_model"]["stage"] == "memory"
    assert episode["total_frames"] == episode["switch_frame"] + episode["generated_frames"]
    video = read_mp4(tmp_path / "out" / "demo.mp4")
    assert video.shape[0] == episode["total_frames"]
    assert (tmp_path / "out" / "revisit.png").stat().st_size > 0


def test_same_seed_same_frames_and_policies_differ(models):
    loaded = load_models(models)
    first = run_demo(loaded, models, episode_index=1, seed=3, progress=False)
    again = run_demo(loaded, models, episode_index=1, seed=3, progress=False)
    other = run_demo(loaded, models, episode_index=1, seed=4, progress=False)
    for name in DEMO_POLICIES:
        np.testing.assert_array_equal(first.frames[name], again.frames[name])
    assert not np.array_equal(first.frames["mag"], other.frames["mag"])
    # Same noise, different caches: the generated frames differ only through what each cache kept.
    assert not np.array_equal(first.frames["mag"], first.frames["window"])
    columns = revisit_columns(first)
    assert columns.size and (first.episode.history_match[columns] >= 0).all()
    # The headline number against an independent computation: PSNR of the mean squared error between
    # each revisited generated frame and the history frame of the same view (uint8, peak 255).
    ep = first.episode
    revisited = ep.history_match >= 0
    for name in DEMO_POLICIES:
        error = (
            first.frames[name][revisited].astype(np.float64)
            - ep.frames[ep.history_match[revisited]]
        )
        expected = 10 * np.log10(255.0**2 / np.mean(error**2))
        assert revisit_psnr(first, name, "all") == pytest.approx(expected, rel=1e-9)


def test_compose_panels_places_each_panel_under_its_label():
    rng = np.random.default_rng(0)
    panels = [rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8) for _ in range(3)]
    out = compose_panels(panels, ["a", "b", "c"], ["x", "y"], np.array([False, True]), scale=2)
    assert out.shape == (2, LABEL_BAND_PX + 8 + STATUS_BAND_PX, 3 * 10 + 2 * PANEL_GAP_PX, 3)
    for i, panel in enumerate(panels):
        x = i * (10 + PANEL_GAP_PX)
        np.testing.assert_array_equal(out[:, LABEL_BAND_PX:LABEL_BAND_PX + 8, x:x + 10],
                                      panel.repeat(2, axis=1).repeat(2, axis=2))
    assert out[:, :LABEL_BAND_PX].any() and out[:, -STATUS_BAND_PX:].any()  # text was drawn
    assert not np.array_equal(out[0, -STATUS_BAND_PX:], out[1, -STATUS_BAND_PX:])


@pytest.mark.parametrize("case", ["missing-model", "generator-as-memory", "unwritable",
                                  "bad-episode"])
def test_errors_are_one_line(case, models, tmp_path, capsys):
    config, out, extra = models, tmp_path / "out", []
    if case == "missing-model":
        config = DemoConfig(model=str(tmp_path / "nope.safetensors"),
                            memory_model=models.memory_model)
    elif case == "generator-as-memory":
        config = DemoConfig(model=models.model, memory_model=models.model)
    elif case == "unwritable":
        out.write_text("a file, not a folder")
    else:
        extra = ["--episode", "-1"]
    assert _cli(config, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mag: error: "), err
