"""The codec interface: video pixels <-> latent frames the DiT works on.

Layout convention everywhere in ``mag``: frames before channels.
    video:   [B, T, 3, H, W] float in [-1, 1] latents: [B, F, C, h, w] with h = H /
    spatial_compression, w = W / spatial_compression
A causal codec maps T = 1 + k * temporal_compression video frames to F = 1 + k latent frames (the
first frame is coded alone); the identity codec maps T to T.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from mag.errors import InputError

__all__ = ["Codec", "StreamDecoder", "frames_to_tensor", "tensor_to_frames", "VIDEO_CHANNELS",
           "UINT8_MAX"]

VIDEO_CHANNELS = 3
"""RGB."""
UINT8_MAX = 255.0
"""Largest uint8 value; [0, 255] maps linearly onto [-1, 1]."""


class StreamDecoder(ABC):
    """Decodes a latent stream piece by piece, carrying whatever temporal state the codec needs.

    ``decode(latents [B, f, C, h, w]) -> video [B, t, 3, H, W]``; the concatenation of the pieces
    equals one-shot ``Codec.decode`` of the whole stream (up to float tolerance).
    """

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Decode the next ``f`` latent frames of the stream."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the stream; the next ``decode`` starts a new one."""


class Codec(ABC):
    """Encoder/decoder between video and latent frames.

    Attributes:
        name: registry name.
        latent_channels: C of one latent frame.
        spatial_compression: H / h.
        temporal_compression: video frames per latent frame after the first.
    """

    name: str
    latent_channels: int
    spatial_compression: int
    temporal_compression: int

    @abstractmethod
    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [-1, 1] -> latents [B, F, C, h, w]."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, F, C, h, w] -> video [B, T, 3, H, W] in [-1, 1]."""

    @abstractmethod
    def stream_decoder(self) -> StreamDecoder:
        """A fresh decoder for frame-by-frame (streaming) decoding of one batch of streams."""

    def latent_frames(self, num_video_frames: int) -> int:
        """Latent frames that ``num_video_frames`` video frames encode to (InputError if
        impossible)."""
        k = self.temporal_compression
        if num_video_frames < 1 or (num_video_frames - 1) % k:
            allowed = "any T >= 1" if k == 1 else f"T = 1 + {k}*n (1, {1 + k}, {1 + 2 * k}, ...)"
            raise InputError(f"codec {self.name!r} needs {allowed} video frames, got "
                             f"T={num_video_frames}")
        return 1 + (num_video_frames - 1) // k

    def video_frames(self, num_latent_frames: int) -> int:
        """Video frames that ``num_latent_frames`` latent frames decode to."""
        if num_latent_frames < 1:
            raise InputError(f"codec {self.name!r} needs at least 1 latent frame, got "
                             f"{num_latent_frames}")
        return 1 + (num_latent_frames - 1) * self.temporal_compression

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Codec:
        """Move any weights; parameter-free codecs return themselves."""
        return self

    def parameter_bytes(self) -> int:
        """Bytes of the codec's weights (0 for parameter-free codecs)."""
        return 0

    # -- shared input checks ------------------------------------------------------------------

    def _check_video(self, video: Tensor) -> None:
        if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[2] != VIDEO_CHANNELS:
            found = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise InputError(f"codec {self.name!r} expects video [B, T, 3, H, W], got {found}")
        if not video.is_floating_point():
            raise InputError(
                f"codec {self.name!r} expects float video in [-1, 1], got dtype {video.dtype};"
                " convert uint8 frames with mag.codecs.frames_to_tensor"
            )
        self.latent_frames(video.shape[1])
        s = self.spatial_compression
        height, width = video.shape[-2:]
        if height % s or width % s:
            raise InputError(
                f"codec {self.name!r} needs H and W divisible by {s}, got H={height}, W={width}"
            )

    def _check_latents(self, latents: Tensor) -> None:
        if not isinstance(latents,
                          Tensor) or latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            found = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise InputError(
                f"codec {self.name!r} expects latents [B, F, {self.latent_channels}, h, w], got "
                f"{found}"
            )
        if latents.shape[1] < 1:
            raise InputError(f"codec {self.name!r} needs at least 1 latent frame, got "
                             f"{latents.shape[1]}")


def frames_to_tensor(frames: np.ndarray) -> Tensor:
    """uint8 frames [T, H, W, 3] (as video readers return them) -> float32 [T, 3, H, W] in [-1,
    1]."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        found = frames.dtype if isinstance(frames, np.ndarray) else type(frames).__name__
        raise InputError(f"frames_to_tensor expects a uint8 numpy array [T, H, W, 3], got {found}")
    if frames.ndim != 4 or frames.shape[-1] != VIDEO_CHANNELS:
        raise InputError(f"frames_to_tensor expects shape [T, H, W, 3], got {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return x * (2.0 / UINT8_MAX) - 1.0


def tensor_to_frames(video: Tensor) -> np.ndarray:
    """float [T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3], clamped and rounded to nearest."""
    if not isinstance(video, Tensor) or video.ndim != 4 or video.shape[1] != VIDEO_CHANNELS:
        found = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise InputError(f"tensor_to_frames expects a tensor [T, 3, H, W], got {found}")
    x = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * (UINT8_MAX / 2.0)).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
