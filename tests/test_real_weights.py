"""The whole command path on small-config files in the upstream formats: a Wan2.1 folder (small VAE
and UMT5 in their original .pth layouts), an official MAG generator and memory folder, a
Self-Forcing .pt. The code that runs at full size (format detection, UMT5 from the .pth, the
official cache geometry, the streaming VAE decode, the mp4 writer) writes a video here, on the
CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import TINY_DIT  # noqa: E402
from helpers import random_dit  # noqa: E402
from official_files import write_mag_folder, write_self_forcing, write_wan_folder  # noqa: E402

from mag.app import text_cache  # noqa: E402
from mag.cli import build_parser, main  # noqa: E402
from mag.codecs import WanVAECodec, tensor_to_frames  # noqa: E402
from mag.config import get_preset  # noqa: E402
from mag.errors import ConfigError  # noqa: E402
from mag.io import read_mp4, write_mp4  # noqa: E402
from mag.pipelines import MagPipeline, SamplerConfig  # noqa: E402
from mag.real_weights import loaded_from_pipeline, pipeline_from_args  # noqa: E402
from mag.serve.live import LiveStream  # noqa: E402
from mag.text import UMT5Encoder, minilm_path  # noqa: E402

# Wan's layout at toy widths: 16 latent channels (the Wan VAE's), UMT5 32 wide, 2 layers of 24.
DIT = dataclasses.replace(TINY_DIT, in_channels=16, out_channels=16, text_dim=32)
HEIGHT, WIDTH = 64, 96  # non-square, so a swapped height / width cannot pass
SIZE = {"video.height": HEIGHT, "video.width": WIDTH}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    vae = WanVAECodec.from_config({"base_dim": 8}, seed=3)
    t5 = UMT5Encoder.tiny_random(minilm_path(), seed=4, relative_attention_max_distance=128)
    wan = write_wan_folder(random_dit(DIT, seed=0), vae, t5, root / "Wan2.1-T2V-1.3B")
    generator = write_mag_folder(random_dit(DIT, seed=1), root / "MAG" / "generator")
    memory = write_mag_folder(random_dit(DIT, seed=2), root / "MAG" / "memory")
    sf = write_self_forcing(random_dit(DIT, seed=5), random_dit(DIT, seed=6),
                            root / "self_forcing_dmd.pt")
    return {"wan": wan, "generator": generator, "memory": memory, "self_forcing": sf}


def _generate(files, out, *extra):
    return main(["generate", "--wan-dir", str(files["wan"]), "--weights", str(files["generator"]),
                 "--memory-weights", str(files["memory"]), "--prompt", "a red fox in the snow",
                 "--seconds", "1", "--height", str(HEIGHT), "--width", str(WIDTH), "--no-progress",
                 "-o", str(out), *extra])


def test_official_files_stream_to_an_mp4_with_every_decoded_frame(files, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert _generate(files, out) == 0
    printed = capsys.readouterr().out
    # 1 s at 16 fps = 4 latent frames -> 2 blocks of 3 = 6 latent frames -> 1 + 4 * 5 = 21 video
    # frames
    video = read_mp4(out, downscale=2)  # 64 px frames are upscaled to 128 px for H.264
    assert video.shape == (21, HEIGHT, WIDTH, 3)
    assert "policy official" in printed and "21 frames" in printed


def test_the_pipeline_equals_generating_all_latents_then_one_whole_video_decode(files):
    pipe = MagPipeline.from_pretrained(files["generator"], wan_dir=files["wan"],
                                       memory_weights=files["memory"], **SIZE)
    assert pipe.policy_name == "official" and pipe.generator.meta["source_format"] == "official-mag"
    streamed = list(pipe.stream("a red fox in the snow", latent_frames=6, seed=3))
    gen = pipe.streaming_generator()
    gen.reset(1, 6)
    gen.set_prompt(pipe.encode(["a red fox in the snow"]))
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = torch.cat([gen.generate_block(noise) for _ in range(2)], 1)
    whole = tensor_to_frames(pipe.codec.decode(latents)[0])
    # the plan is what the stream allocates
    assert pipe.kv_cache_bytes(6) == gen.cache.capacity_bytes
    assert len(streamed) == len(whole) == 21
    diff = max(int(abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(streamed, whole,
                                                                             strict=True))
    assert diff <= 1  # uint8 rounding of float-identical decodes
    assert whole.std() > 1  # not a constant video


def test_a_self_forcing_checkpoint_runs_without_a_memory_model(files, tmp_path):
    out = tmp_path / "sf.mp4"
    assert main(["generate", "--wan-dir", str(files["wan"]), "--weights",
                 str(files["self_forcing"]),
                 "--policy", "window", "--prompt", "a boat", "--seconds", "0.5", "--height",
                 str(HEIGHT), "--width", str(WIDTH), "--no-progress", "-o", str(out)]) == 0
    # 3 latent frames -> 9 video frames
    assert read_mp4(out, downscale=2).shape == (9, HEIGHT, WIDTH, 3)


def test_bf16_end_to_end_casts_every_model(files):
    pipe = MagPipeline.from_pretrained(files["generator"], wan_dir=files["wan"],
                                       memory_weights=files["memory"], dtype=torch.bfloat16, **SIZE)
    assert pipe.generator.model.patch_embedding.weight.dtype == torch.bfloat16
    assert (
        pipe.memory.patch_embedding.weight.dtype == torch.bfloat16
        and pipe.codec.dtype == torch.bfloat16
    )
    frames = list(pipe.stream("a boat", latent_frames=3))
    assert len(frames) == 9 and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_wrong_files_fail_in_one_line_before_anything_is_written(files, tmp_path, capsys):
    out = tmp_path / "never" / "out.mp4"
    cases = {
        ("--wan-dir", str(tmp_path)): "holds nothing",
        ("--weights", str(files["wan"] / "Wan2.1_VAE.pth")): "",
        ("--memory-weights", str(tmp_path / "missing")): "does not exist",
    }
    for (flag, value), expected in cases.items():
        argv = ["generate", "--wan-dir", str(files["wan"]), "--weights", str(files["generator"]),
                "--memory-weights", str(files["memory"]), "--prompt", "x", "--seconds", "0.5",
                "--height", str(HEIGHT), "--width", str(WIDTH), "--no-progress", "-o", str(out)]
        argv[argv.index(flag) + 1] = value
        assert main(argv) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("mag: error:") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "never").exists()


def test_generate_help_names_every_file_a_user_passes(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--wan-dir", "--weights", "--memory-weights", "--out", "--seconds", "--dtype"):
        assert flag in text, flag
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                 "diffusion_pytorch_model.safetensors", ".pt"):
        assert name in text, name


def _doc_commands() -> list[list[str]]:
    """The ``mag ...`` commands of docs/real-weights.md's bash blocks, continuation lines joined."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "real-weights.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("mag "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_documented_commands_parse_and_the_generate_ones_run(files, tmp_path):
    """The doc's commands are the tested ones: every one parses with the real parser, and the
    generate and MAG-Bench commands run as written, with the downloaded paths pointing at the small
    files, the device set to the CPU and the length and size cut to what a CPU test affords."""
    commands = _doc_commands()
    assert [c[:2] for c in commands] == [["weights", "download"], ["generate", "--wan-dir"],
                                         ["generate", "--wan-dir"], ["weights", "convert"],
                                         ["bench", "speed"], ["bench", "consistency"]]
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)
    paths = {"weights/Wan2.1-T2V-1.3B": files["wan"], "weights/MAG/generator": files["generator"],
             "weights/MAG/memory": files["memory"],
             "weights/Self-Forcing/checkpoints/self_forcing_dmd.pt": files["self_forcing"]}
    for argv in commands[1:3]:
        argv = [str(paths.get(a, a)) for a in argv]
        argv[argv.index("--device") + 1] = "cpu"
        argv[argv.index("--seconds") + 1] = "0.5"
        argv[argv.index("-o") + 1] = str(tmp_path / argv[argv.index("-o") + 1])
        assert main([*argv, "--height", str(HEIGHT), "--width", str(WIDTH),
                     "--no-progress"]) == 0, argv
        assert read_mp4(tmp_path / Path(argv[argv.index("-o") + 1]).name, downscale=2).shape == (
            9, HEIGHT, WIDTH, 3)
    # MAG-Bench: 45 frames keep 12 latent frames and switch after 9 (frame 33): one block generated
    videos = tmp_path / "MAG-Bench" / "videos"
    videos.mkdir(parents=True)
    clip = np.random.default_rng(0).integers(0, 256, (45, HEIGHT, WIDTH, 3), dtype=np.uint8)
    write_mp4(videos / "clip.mp4", clip, 16)
    paths["MAG-Bench/videos"] = videos
    argv = [str(paths.get(a, a)) for a in commands[5]]
    argv[argv.index("--device") + 1] = "cpu"
    out = tmp_path / argv[argv.index("-o") + 1]
    argv[argv.index("-o") + 1] = str(out)
    assert main([*argv, "--height", str(HEIGHT), "--width", str(WIDTH), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "magbench" and set(summary["policies"]) == {"official", "window"}
    for row in summary["policies"].values():
        assert row["clips"][0]["switch_frame"] == 33 and row["clips"][0]["frames"] == 45
        assert all(33 <= j < 45 for j in row["clips"][0]["matched_frames"])
        assert 0 < row["lpips"] and np.isfinite(row["psnr"])


def _files_args(files, command: str) -> list[str]:
    return [*command.split(), "--wan-dir", str(files["wan"]), "--weights", str(files["generator"]),
            "--memory-weights", str(files["memory"]), "--device", "cpu"]


def test_serve_publishes_every_decoded_frame_of_the_official_files(files):
    args = build_parser().parse_args(_files_args(files, "serve"))
    pipe = pipeline_from_args(args, **SIZE)
    loaded, codec = loaded_from_pipeline(pipe)
    live = LiveStream(loaded, pipe.policy_name, SamplerConfig(), "a boat", max_frames=9, seed=0,
                      codec=codec)
    first, second = live.step(), live.step()
    assert pipe.policy_name == "official"
    assert [len(first), len(second)] == [9, 12]  # the causal VAE: 1 + 4 + 4, then 4 + 4 + 4
    assert [f.index for f in first + second] == list(range(21))
    assert [f.stream_frame for f in second][::4] == [3, 4, 5]


def test_bench_speed_streams_the_official_files_with_their_vae(files, tmp_path):
    out = tmp_path / "speed.json"
    argv = _files_args(files, "bench speed")
    assert main([*argv, "--policies", "official,window", "--frames", "9", "--height", str(HEIGHT),
                 "--width", str(WIDTH), "--rounds", "1", "--no-progress", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["policies"]) == {"official", "window"}


def test_bench_consistency_loads_the_official_files_and_says_why_frames_cannot_align(files,
                                                                                     tmp_path,
                                                                                       capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.zeros((24, 480, 832, 3), np.uint8)
    write_mp4(videos / "clip.mp4", frames, 16)
    (videos / "switch_times.json").write_text(json.dumps({"clip.mp4": 12}))
    argv = _files_args(files, "bench consistency")
    assert main([*argv, "--videos", str(videos), "--policies", "official", "--no-lpips",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs a codec without temporal compression" in err and err.count("\n") == 1


def test_a_wan_model_file_without_a_text_mode_asks_for_the_umt5_weights_not_a_mode():
    """A wan-1.3b model file says no text mode; umT5 has only per-token outputs, so the app asks for
    the encoder's weights (the Wan2.1 folder) instead of failing on the tiny models' pooled mode."""
    with pytest.raises(ConfigError, match="needs weights: path="):
        text_cache(get_preset("wan-1.3b"), {})


def test_a_converted_model_file_streams_the_same_frames_as_the_folder_it_came_from(files, tmp_path):
    for name in ("generator", "memory"):
        stage = "memory" if name == "memory" else "mag-generator"
        assert main(["weights", "convert", str(files[name]), "--stage", stage,
                     "-o", str(tmp_path / f"{name}.safetensors")]) == 0
    kwargs = {"wan_dir": files["wan"], **SIZE}
    ours = MagPipeline.from_pretrained(tmp_path / "generator.safetensors",
                                       memory_weights=tmp_path / "memory.safetensors", **kwargs)
    theirs = MagPipeline.from_pretrained(files["generator"], memory_weights=files["memory"],
                                         **kwargs)
    assert ours.generator.meta["source_format"] == "mag-model" and ours.policy_name == "official"
    for a, b in zip(ours.stream("a kite", latent_frames=6), theirs.stream("a kite",
                                                                          latent_frames=6),
                    strict=True):
        assert np.array_equal(a, b)


def test_bench_consistency_takes_a_frame_size_only_with_downloaded_weights(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "consistency", "--protocol", "magbench", "--videos", str(tmp_path),
                 "--height", "64", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--height and --width go with --wan-dir" in err and err.count("\n") == 1
    assert not out.exists()
