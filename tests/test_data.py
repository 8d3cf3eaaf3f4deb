"""``mag data encode`` -> latent shards -> the streaming loader, and the prompt-file loader.

A few generated mp4 files are encoded with a tiny random Wan VAE; the loader's clips must be exactly
the VAE latents of the files it names, each clip once per epoch, in an order that ranks split and a
resumed run repeats.
"""

from __future__ import annotations

import pytest
import torch
from helpers import write_captioned_videos
from safetensors.torch import load_file

from mag.cli import main
from mag.codecs import WanVAECodec
from mag.data import PromptFileSource, read_prompt_file
from mag.data.encode import encode_clip
from mag.data.shards import LatentShardSource, read_index, shard_name
from mag.errors import InputError

CLIPS, LATENT_FRAMES, SIZE, SHARD = 3, 3, 16, 2
CAPTIONS = ["a red ball rolls", "waves on a beach", "a cat, sleeping"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory):
    frames = WanVAECodec.tiny_random().video_frames(LATENT_FRAMES) + 2  # longer than needed
    return write_captioned_videos(tmp_path_factory.mktemp("videos"), CAPTIONS, frames, SIZE)


def _encode(videos, out) -> int:
    return main(["data", "encode", str(videos), str(videos / "captions.csv"), "-o", str(out),
                 "--frames",
                 str(LATENT_FRAMES), "--vae-tiny", "--shard-size", str(SHARD), "--no-progress"])


@pytest.fixture(scope="module")
def shards(videos, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("shards") / "latents"
    assert _encode(videos, out) == 0
    return out


def test_encode_writes_shards_whose_rows_the_loader_reads_back_exactly(videos, shards):
    index = read_index(shards)
    assert [s["count"] for s in index["shards"]] == [2, 1] and index["clips"] == CLIPS
    codec = WanVAECodec.tiny_random()
    source = LatentShardSource(shards, LATENT_FRAMES, seed=0, micro_batch=CLIPS, grad_accum=1)
    batch = source.batch(0, 0, range(CLIPS))
    rows = [source.row(0, 0, i) for i in range(CLIPS)]
    assert sorted(rows) == list(range(CLIPS))  # one epoch: every clip once
    for i, row in enumerate(rows):
        expected = encode_clip(codec, videos / f"v{row}.mp4", LATENT_FRAMES, torch.device("cpu"))
        assert torch.equal(batch.video[i], expected)
        assert batch.prompts[i] == CAPTIONS[row]
    assert batch.video.shape == (CLIPS, LATENT_FRAMES, codec.latent_channels, SIZE // 8, SIZE // 8)


def test_loader_order_is_split_by_ranks_and_repeats_on_resume(shards):
    source = LatentShardSource(shards, LATENT_FRAMES, seed=3, micro_batch=2, grad_accum=2)
    whole = [source.row(5, 1, i) for i in range(2)]
    assert [source.row(5, 1, 0)] + [source.row(5, 1, 1)] == whole
    again = LatentShardSource(shards, LATENT_FRAMES, seed=3, micro_batch=2, grad_accum=2)
    assert [again.row(s, m, i) for s in range(4) for m in range(2) for i in range(2)] == \
           [source.row(s, m, i) for s in range(4) for m in range(2) for i in range(2)]
    # Consecutive samples walk through epochs: samples 0..2 and 3..5 are each a permutation.
    order = [source.row(s, m, i) for s in range(2) for m in range(2) for i in range(2)]
    assert sorted(order[:3]) == sorted(order[3:6]) == list(range(CLIPS))


def test_encode_resumes_at_the_first_missing_shard(videos, shards, tmp_path):
    out = tmp_path / "again"
    assert _encode(videos, out) == 0
    first = (out / shard_name(0)).stat().st_mtime_ns
    second = load_file(str(out / shard_name(1)))
    (out / shard_name(1)).unlink()
    assert _encode(videos, out) == 0
    assert (out / shard_name(0)).stat().st_mtime_ns == first  # not rewritten
    again = load_file(str(out / shard_name(1)))
    # The same clip re-encoded (the CPU convolutions may pick other kernels in a long test session).
    torch.testing.assert_close(again["latents"], second["latents"], rtol=0, atol=1e-5)
    assert [s["count"] for s in read_index(out)["shards"]] == [2, 1]


def test_encode_refuses_missing_videos_before_writing(videos, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("video,caption\nv0.mp4,x\nnope.mp4,y\n")
    out = tmp_path / "out"
    assert main(["data", "encode", str(videos), str(bad), "-o", str(out), "--frames", "3",
                 "--vae-tiny"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_prompt_file_loader_skips_blank_lines_and_draws_reproducibly(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second prompt  \nthird\n")
    assert read_prompt_file(path) == ["first prompt", "second prompt", "third"]
    a, b = PromptFileSource(path, 6, seed=1), PromptFileSource(path, 6, seed=1)
    batch = a.batch(4, 1, range(3))
    assert batch.prompts == b.batch(4, 1, range(3)).prompts
    # a rank's slice is the same draw
    assert batch.prompts[1:] == a.batch(4, 1, range(1, 3)).prompts
    assert batch.camera_px.shape == (3, 6)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
