"""MAG-Bench's own protocol (``--protocol magbench``): the cut, the LPIPS matching, the command end
to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mag.bench.consistency import bench_world, stream_episodes
from mag.bench.consistency.episodes import BenchEpisode
from mag.bench.consistency.magbench import (
    MagBenchClip,
    generate_clip,
    magbench_clips,
    magbench_cut,
    run_magbench,
    score_nearest,
)
from mag.bench.consistency.scores import ConsistencyConfig
from mag.bench.lpips import lpips, lpips_matrix
from mag.checkpoint import TrainingState, save_checkpoint
from mag.cli import main
from mag.codecs import WanVAECodec, frames_to_tensor, get_codec_for
from mag.config import get_preset
from mag.errors import InputError
from mag.io.video import write_mp4
from mag.models import WanDiT
from mag.pipelines import SamplerConfig, StreamingGenerator, load_any_dit, policy_from_name
from mag.schedulers import FlowMatchScheduler
from mag.world import make_episode

SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "video.height": 16, "video.width": 16}
WORLD = {"pano_width": 96, "speed_range_px": [4, 4], "speed_quantum_px": 4,
         "excursion_frames_range": [6, 9], "pause_frames_range": [0, 1], "legs_range": [3, 5],
         "episode_frames": 30}
CLIP_FRAMES = {"a.mp4": 24, "b.mp4": 29}
WAN_COMPRESSION, WAN_BLOCK = 4, 3


@pytest.fixture(scope="module")
def preset():
    return get_preset("tiny", **SMALL)


@pytest.fixture(scope="module")
def model(preset):
    torch.manual_seed(0)
    model = WanDiT(preset.dit).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, preset, model):
    recipe = {"name": "test-recipe", "data": {"world": WORLD, "text_mode": "pooled"}}
    state = TrainingState(step=3, model=model.state_dict(), ema=None, optimizer=None, rng={},
                          metadata={"preset": preset.to_dict(), "recipe": recipe,
                                    "kind": "training"},
                          extra={})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), state)


@pytest.fixture(scope="module")
def videos(tmp_path_factory, preset):
    """Two small generated videos (panorama-world episodes) and a prompt for one of them."""
    folder = tmp_path_factory.mktemp("videos")
    world, _ = bench_world(preset, training_world=WORLD)
    for index, (name, frames) in enumerate(CLIP_FRAMES.items()):
        write_mp4(folder / name, make_episode("test", index, config=world).frames[:frames], fps=16)
    (folder / "prompts.json").write_text(json.dumps({"b.mp4": "a desert"}))
    return folder


def _run(*args: str) -> int:
    return main(["bench", "consistency", "--no-progress", *args])


def _official_cut(frames: int) -> tuple[int, int] | None:
    """MAG's mag_bench_dataset at 16 fps (duration x 16 = frames), None where it asserts."""
    kept = (frames + 3) // 12 * 12 - 3
    switch = math.ceil((math.floor(frames * 0.75) + 3) / 12) * 12 - 3
    return (kept, switch) if switch < kept else None


def test_the_cut_is_the_official_one_with_the_wan_vae_and_three_frame_blocks():
    for frames in range(9, 400):
        official = _official_cut(frames)
        if official is None:
            with pytest.raises(InputError, match="no whole block"):
                magbench_cut(frames, WAN_COMPRESSION, WAN_BLOCK)
        else:
            assert magbench_cut(frames, WAN_COMPRESSION, WAN_BLOCK) == official, frames
    # 27 latent frames, switch after 21
    assert magbench_cut(105, WAN_COMPRESSION, WAN_BLOCK) == (105, 81)


def test_the_cut_without_temporal_compression_is_whole_blocks():
    assert magbench_cut(24, 1, 3) == (24, 18)
    # floor(21.75) = 21, a block boundary; 27 whole-block frames
    assert magbench_cut(29, 1, 3) == (27, 21)
    assert magbench_cut(30, 1, 3) == (30, 24)  # floor(22.5) = 22 -> up to 24


def test_lpips_matrix_equals_pairwise_spatial_lpips():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 40, 48, generator=gen), torch.rand(4, 3, 40, 48, generator=gen)
    matrix = lpips_matrix(a, b)
    for i in range(a.shape[0]):
        pairs = lpips(a[i:i + 1].expand_as(b), b, spatial=True).mean(dim=(1, 2, 3))
        assert torch.allclose(matrix[i], pairs, atol=1e-5, rtol=1e-4)
    assert float(matrix.min()) > 0


def test_nearest_matching_recovers_a_shuffled_return_segment(preset, videos):
    clip = magbench_clips(videos, preset, temporal_compression=1)[0]
    truth = frames_to_tensor(clip.frames[clip.switch_frame:]).add(1.0).div(2.0)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    scores = score_nearest(truth[order], truth)
    assert scores.matched == order.tolist()
    assert scores.lpips == pytest.approx(0.0, abs=1e-6) and scores.ssim == pytest.approx(1.0)
    shifted = score_nearest(truth[order].roll(1, dims=-1), truth)
    assert shifted.lpips > 1e-3 and shifted.psnr < scores.psnr


def test_clips_take_every_video_the_cut_and_the_prompt_table(preset, videos):
    clips = magbench_clips(videos, preset, temporal_compression=1)
    assert [(c.name, c.frames.shape[0], c.switch_frame, c.prompt) for c in clips] == [
        ("a.mp4", 24, 18, ""), ("b.mp4", 27, 21, "a desert")]
    assert clips[0].frames.shape[1:] == (16, 16, 3)


def test_generate_clip_streams_like_the_frame_aligned_runner(preset, model):
    """Same model, policy, noise and clip: the generated frames equal stream_episodes' (pixel
    codec)."""
    frames = (np.random.default_rng(0).random((12, 16, 16, 3)) * 255).astype(np.uint8)
    codec = get_codec_for(preset.video)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    context = torch.zeros(1, 1, preset.dit.text_dim)

    def gen() -> StreamingGenerator:
        return StreamingGenerator(model, scheduler, preset, policy_from_name("window", preset),
                                  sampler=SamplerConfig())

    clip = MagBenchClip("x", frames, 6)
    ours = generate_clip(gen(), codec, clip, context, torch.Generator().manual_seed(7))
    episode = BenchEpisode("x", frames, 6, 6, "", np.full(6, -1))
    theirs = stream_episodes(gen(), codec, [episode], context, False,
                             torch.Generator().manual_seed(7))[0]
    ours_uint8 = (ours * 255).round().permute(0, 2, 3, 1).numpy()
    assert ours.shape == (6, 3, 16, 16)
    assert np.abs(ours_uint8 - theirs.astype(np.float64)).max() <= 1


def test_the_magbench_protocol_runs_end_to_end_on_small_videos(tmp_path, checkpoint, videos,
                                                               capsys):
    out = tmp_path / "magbench"
    assert _run("--model", str(checkpoint), "--videos", str(videos), "--protocol", "magbench",
                "--policies", "full,window", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "magbench" and set(summary["policies"]) == {"full", "window"}
    for row in summary["policies"].values():
        clips = row["clips"]
        assert [(c["video"], c["frames"], c["switch_frame"]) for c in clips] == [("a.mp4", 24, 18),
                                                                               ("b.mp4", 27, 21)]
        for clip in clips:
            assert len(clip["matched_frames"]) == clip["frames"] - clip["switch_frame"]
            assert all(clip["switch_frame"] <= j < clip["frames"] for j in clip["matched_frames"])
            assert 0 < clip["lpips"] < 1
        for metric in ("lpips", "psnr", "ssim"):
            assert row[metric] == pytest.approx(np.mean([c[metric] for c in clips]))
    assert "| full |" in (out / "summary.md").read_text()
    assert "nearest ground-truth frame" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    ((), "give --videos"),
    (("--videos", "VIDEOS", "--teacher-forced", "--no-lpips"), "drop --teacher-forced, --no-lpips"),
])
def test_magbench_flag_errors_are_one_line(tmp_path, checkpoint, videos, capsys, extra, message):
    args = [str(videos) if a == "VIDEOS" else a for a in extra]
    out = tmp_path / "o"
    assert _run("--model", str(checkpoint), "--protocol", "magbench", *args, "--out", str(out)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mag: error: ") and message in lines[0]
    assert not out.exists()


def test_a_clip_too_short_for_a_block_after_the_switch_is_an_input_error(tmp_path, preset):
    write_mp4(tmp_path / "short.mp4", np.zeros((5, 16, 16, 3), np.uint8), fps=16)
    with pytest.raises(InputError, match="short.mp4: a clip of 5 frames"):
        magbench_clips(tmp_path, preset, temporal_compression=1)


def test_the_protocol_runs_with_the_wan_vae_and_the_official_mag_models():
    """Temporal compression 4: the official-format small VAE, generator and memory model (official
    policy)."""
    data = Path(__file__).parent / "data" / "official"
    size = {"video.height": 16, "video.width": 32}  # latents [16, 2, 4] at the VAE's 8x
    generator = load_any_dit(data / "mag_generator", **size)
    memory = load_any_dit(data / "mag_memory", stages=("memory",), **size)
    ref = load_file(str(data / "mag_stream.safetensors"))
    about = _vae_config(data / "vae_decode.safetensors")
    same_names = ("dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
    config = {"base_dim": about["dim"], **{k: about[k] for k in same_names}}
    codec = WanVAECodec.from_pretrained(data / "wan_vae.pth", config=config)
    frames = (np.random.default_rng(1).random((57, 16, 32, 3)) * 255).astype(np.uint8)
    clip = MagBenchClip("wan.mp4", frames, 45)  # 15 latent frames, the switch after 12
    assert magbench_cut(57, codec.temporal_compression,
                        generator.preset.cache.frames_per_block) == (57, 45)
    rows = run_magbench(generator.model, generator.preset, [clip], lambda prompts: ref["context"],
                        ConsistencyConfig(policies=("official",)),
                        memory_model=memory.model, empty_context=ref["empty_context"], codec=codec)
    (scores,) = rows["official"]
    assert len(scores.matched) == 12 and all(0 <= j < 12 for j in scores.matched)
    assert 0 < scores.lpips < 1 and math.isfinite(scores.psnr)


def _vae_config(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["about"])["config"]
