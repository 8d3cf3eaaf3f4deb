"""Codecs: shapes, frame-count rules, normalisation convention, streaming decode, uint8 helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official_files import vae_original_name

from mag.codecs import (
    PixelCodec,
    WanVAECodec,
    frames_to_tensor,
    get_codec,
    get_codec_for,
    tensor_to_frames,
)
from mag.config import get_preset
from mag.errors import CheckpointError, ConfigError, InputError

# smallest sizes divisible by the 8x spatial compression, non-square to catch H/W swaps
H, W = 16, 24


@pytest.fixture(scope="module")
def wan() -> WanVAECodec:
    return WanVAECodec.tiny_random(seed=0)


def _video(t: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, H, W, generator=gen) * 2 - 1


def test_unknown_codec_lists_choices():
    with pytest.raises(ConfigError, match="pixel.*wan-vae"):
        get_codec("vqgan")


def test_wan_vae_without_weights_says_how_to_get_them():
    with pytest.raises(ConfigError, match="path="):
        get_codec("wan-vae")


def test_pixel_round_trip_is_exact():
    codec = get_codec("pixel")
    video = _video(7)
    latents = codec.encode(video)
    assert latents.shape == video.shape
    assert torch.equal(codec.decode(latents), video)
    assert codec.latent_frames(7) == 7 and codec.video_frames(7) == 7


def test_pixel_rejects_wrong_channels_and_uint8():
    codec = PixelCodec()
    with pytest.raises(InputError, match=r"\[B, T, 3, H, W\]"):
        codec.encode(torch.zeros(1, 2, 4, 8, 8))
    with pytest.raises(InputError, match="frames_to_tensor"):
        codec.encode(torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match=r"\[B, F, 3, h, w\]"):
        codec.decode(torch.zeros(1, 2, 8, 8))


def test_pixel_codec_matches_tiny_preset():
    codec = get_codec_for(get_preset("tiny").video)
    assert isinstance(codec, PixelCodec)


def test_wan_codec_mismatching_preset_is_config_error(wan):
    video_cfg = get_preset("wan-1.3b").video  # expects 16 latent channels, the tiny VAE has 4
    with pytest.raises(ConfigError, match="latent_channels"):
        get_codec_for(video_cfg, tiny=True)


@pytest.mark.parametrize(("t", "f"), [(1, 1), (5, 2), (9, 3)])
def test_wan_encode_decode_shapes(wan, t, f):
    video = _video(t)
    latents = wan.encode(video)
    assert latents.shape == (2, f, wan.latent_channels, H // 8, W // 8)
    assert wan.latent_frames(t) == f and wan.video_frames(f) == t
    decoded = wan.decode(latents)
    assert decoded.shape == video.shape
    assert decoded.abs().max() <= 1.0


@pytest.mark.parametrize("t", [2, 4, 6])
def test_wan_rejects_frame_counts_not_one_plus_4k(wan, t):
    with pytest.raises(InputError, match=r"T = 1 \+ 4\*n"):
        wan.encode(_video(t))


def test_wan_rejects_sizes_not_divisible_by_8_and_wrong_channels(wan):
    with pytest.raises(InputError, match="divisible by 8"):
        wan.encode(torch.zeros(1, 1, 3, 12, 24))
    with pytest.raises(InputError, match=r"\[B, T, 3, H, W\]"):
        wan.encode(torch.zeros(1, 1, 1, 16, 24))
    with pytest.raises(InputError, match=r"\[B, F, 4, h, w\]"):
        wan.decode(torch.zeros(1, 2, 16, 2, 3))


def test_wan_latents_use_pipeline_normalisation(wan):
    """z = (mu - latents_mean) / latents_std, with mu the posterior mean of the raw VAE."""
    video = _video(5, b=1)
    with torch.no_grad():
        mu = wan.vae.encode(video.transpose(1, 2)).latent_dist.mean.transpose(1, 2)
    mean = torch.tensor(wan.vae.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(wan.vae.config.latents_std).view(1, 1, -1, 1, 1)
    # the tiny VAE has non-trivial statistics
    assert not torch.allclose(mean, torch.zeros_like(mean))
    torch.testing.assert_close(wan.encode(video), (mu - mean) / std)
    latents = torch.randn(1, 2, wan.latent_channels, 2, 3)
    with torch.no_grad():
        raw = wan.vae.decode((latents * std + mean).transpose(1, 2)).sample.transpose(1, 2)
    torch.testing.assert_close(wan.decode(latents), raw)


@pytest.mark.parametrize("pieces", [(1, 1, 1, 1, 1), (1, 4), (2, 3)])
def test_wan_streaming_decode_equals_one_shot(wan, pieces):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, sum(pieces), wan.latent_channels, 2, 3, generator=gen)
    one_shot = wan.decode(latents)
    stream = wan.stream_decoder()
    outputs, start = [], 0
    for n in pieces:
        outputs.append(stream.decode(latents[:, start : start + n]))
        start += n
    assert [o.shape[1] for o in outputs][0] == wan.video_frames(pieces[0])
    torch.testing.assert_close(torch.cat(outputs, dim=1), one_shot, atol=1e-5, rtol=1e-5)


def test_wan_stream_decoders_are_independent_and_reset(wan):
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(1, 3, wan.latent_channels, 2, 3, generator=gen) for _ in range(2))
    sa, sb = wan.stream_decoder(), wan.stream_decoder()
    out_a = [sa.decode(a[:, :1]), sb.decode(b[:, :1]), sa.decode(a[:, 1:]), sb.decode(b[:, 1:])]
    torch.testing.assert_close(torch.cat([out_a[0], out_a[2]], 1), wan.decode(a), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(torch.cat([out_a[1], out_a[3]], 1), wan.decode(b), atol=1e-5,
                               rtol=1e-5)
    sa.reset()
    torch.testing.assert_close(sa.decode(b), wan.decode(b), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="reset"):
        sa.decode(torch.randn(2, 1, wan.latent_channels, 2, 3))


def test_wan_from_pretrained_diffusers_folder_round_trip(wan, tmp_path):
    wan.vae.save_pretrained(tmp_path / "vae")
    loaded = WanVAECodec.from_pretrained(tmp_path)  # a pipeline root with vae/ inside
    latents = torch.randn(1, 2, wan.latent_channels, 2, 3)
    torch.testing.assert_close(loaded.decode(latents), wan.decode(latents))


def test_wan_from_pretrained_missing_or_wrong_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        WanVAECodec.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        WanVAECodec.from_pretrained(tmp_path)
    bad = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"something.else": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE checkpoint"):
        WanVAECodec.from_pretrained(bad)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        WanVAECodec.from_pretrained(corrupt)


def test_uint8_helpers_round_trip_and_range():
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (3, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert frames_to_tensor(np.array([[[[0, 255, 0]]]], dtype=np.uint8)).flatten().tolist() == [-1,
                                                                                                1,
                                                                                                -1]
    np.testing.assert_array_equal(tensor_to_frames(x), frames)
    assert tensor_to_frames(torch.full((1, 3, 1, 1), 5.0)).flatten().tolist() == [255, 255, 255]
    with pytest.raises(InputError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))


def test_wan_from_original_single_file_checkpoint(tmp_path):
    """An original-layout .pth (Wan2.1 structure, tiny widths) loads through diffusers'
    converter."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    # the converter assumes Wan2.1's 2 res blocks
    codec = WanVAECodec.tiny_random(seed=3, num_res_blocks=2)
    state = codec.vae.state_dict()
    original = {vae_original_name(k): v for k, v in state.items()}
    converted = convert_wan_vae_to_diffusers(original)
    assert converted.keys() == state.keys() and all(converted[k] is state[k] for k in state)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, path)
    loaded = WanVAECodec.from_pretrained(path, config=dict(codec.vae.config))
    video = _video(5, b=1)
    torch.testing.assert_close(loaded.encode(video), codec.encode(video))


def test_wan_vae_from_a_wan_folder_reads_its_widths_from_the_file(tmp_path):
    """The original folder's Wan2.1_VAE.pth at test widths loads with no config: base_dim and z_dim
    come from the shapes, the latent normalisation is Wan2.1's (z_dim 16)."""
    codec = WanVAECodec.from_config({"base_dim": 8}, seed=4)
    original = {vae_original_name(k): v for k, v in codec.vae.state_dict().items()}
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    loaded = get_codec("wan-vae", path=tmp_path)
    assert loaded.vae.config.base_dim == 8 and loaded.latent_channels == 16
    latents = torch.randn(1, 3, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.decode(latents), codec.decode(latents))
