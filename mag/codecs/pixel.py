"""The identity codec of the tiny preset: a latent frame is the video frame itself, in [-1, 1].

No weights and no compression, so the tiny DiT sees exact pixels and the benchmark's ground truth
needs no decoder in between. ``decode`` clamps to [-1, 1] like the Wan VAE does, so model outputs
that overshoot still make valid video.
"""

from __future__ import annotations

from torch import Tensor

from mag.codecs.base import VIDEO_CHANNELS, Codec, StreamDecoder

__all__ = ["PixelCodec"]


class _PixelStreamDecoder(StreamDecoder):
    """Stateless: every latent frame is already a video frame."""

    def __init__(self, codec: PixelCodec) -> None:
        self._codec = codec

    def decode(self, latents: Tensor) -> Tensor:
        return self._codec.decode(latents)

    def reset(self) -> None:
        """Nothing to forget."""


class PixelCodec(Codec):
    """video [B, T, 3, H, W] <-> latents [B, T, 3, H, W] (identity, no compression)."""

    name = "pixel"
    latent_channels = VIDEO_CHANNELS
    spatial_compression = 1
    temporal_compression = 1

    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [-1, 1] -> the same tensor (a copy, so callers may modify
        it)."""
        self._check_video(video)
        return video.clone()

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, F, 3, h, w] -> video clamped to [-1, 1]."""
        self._check_latents(latents)
        return latents.clamp(-1.0, 1.0)

    def stream_decoder(self) -> StreamDecoder:
        return _PixelStreamDecoder(self)
