"""Codecs between video and the latent frames the DiT denoises: ``pixel`` (tiny) and ``wan-vae``
(Wan2.1).

``get_codec(name, **kw)`` is the one way in; ``get_codec_for(video_config, **kw)`` also checks that
the codec's compression and channels match a preset's ``VideoConfig``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mag.codecs.base import Codec, StreamDecoder, frames_to_tensor, tensor_to_frames
from mag.codecs.pixel import PixelCodec
from mag.codecs.wan_vae import WanStreamDecoder, WanVAECodec
from mag.config import VideoConfig, build_registered
from mag.errors import ConfigError

__all__ = ["CODECS", "Codec", "PixelCodec", "StreamDecoder", "WanStreamDecoder", "WanVAECodec",
           "frames_to_tensor", "get_codec", "get_codec_for", "tensor_to_frames"]


def _make_pixel() -> Codec:
    return PixelCodec()


def _make_wan_vae(path: str | Path | None = None, config: dict[str, Any] | None = None,
                  seed: int = 0, tiny: bool = False) -> Codec:
    """``path`` -> real weights; ``tiny=True`` -> tiny random test VAE; ``config`` -> random
    weights."""
    if path is not None:
        return WanVAECodec.from_pretrained(path)
    if tiny:
        return WanVAECodec.tiny_random(seed, **(config or {}))
    if config is not None:
        return WanVAECodec.from_config(config, seed=seed)
    raise ConfigError(
        "codec 'wan-vae' needs weights: path=<diffusers VAE folder or Wan2.1_VAE.pth>, or "
        "tiny=True /"
        " config={...} for random weights"
    )


CODECS: dict[str, Callable[..., Codec]] = {"pixel": _make_pixel, "wan-vae": _make_wan_vae}


def get_codec(name: str, **kwargs: Any) -> Codec:
    """Build a codec by registry name (``pixel``: no arguments; ``wan-vae``: see
    ``_make_wan_vae``)."""
    return build_registered("codec", CODECS, name, **kwargs)


def get_codec_for(video: VideoConfig, **kwargs: Any) -> Codec:
    """Build ``video.codec`` and check it produces the latent geometry the preset was built for."""
    codec = get_codec(video.codec, **kwargs)
    found = (codec.latent_channels, codec.spatial_compression, codec.temporal_compression)
    expected = (video.latent_channels, video.spatial_compression, video.temporal_compression)
    if found != expected:
        raise ConfigError(
            f"codec {video.codec!r} gives (latent_channels, spatial, temporal compression) = "
            f"{found}, but the"
            f" preset's video config expects {expected}"
        )
    return codec
