"""Video files: H.264 mp4 through PyAV, and labelled PNG strips of frames (PIL).

Tiny 32x32 frames suffer from H.264's 4:2:0 chroma subsampling (one colour sample per 2x2 pixels)
and its 16x16 macroblocks, so :func:`write_mp4` upscales small frames by an integer factor with
nearest-neighbour (each pixel becomes a flat ``scale x scale`` square, which 4:2:0 keeps exactly)
and :func:`read_mp4` can average those squares back. By default the factor is the smallest that
makes the short side at least ``MIN_SIDE_PX``, so real-size video (480x832) is written at its native
size. Every write goes to a temporary file in the target folder, renamed into place when complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from mag.errors import InputError
from mag.io.files import atomic_path, check_output

__all__ = ["DEFAULT_CRF", "DEFAULT_SCALE", "MIN_SIDE_PX", "MP4_SUFFIXES", "PNG_SUFFIXES",
           "auto_scale", "check_mp4_output", "read_mp4", "write_mp4", "write_png_strip"]

PixelFormat = Literal["yuv420p", "yuv444p"]

# Nearest-neighbour upscale the world previews use (32x32 frames become 128x128).
DEFAULT_SCALE = 4
# Short side (px) that small frames are upscaled to reach; larger frames are written as they are.
MIN_SIDE_PX = 128
# x264 constant rate factor: 0 is lossless, 23 is x264's default; 12 keeps flat synthetic frames
# sharp.
DEFAULT_CRF = 12
# PNG strips: gap between frames and rows (px), label band height (px), background and text colours.
STRIP_GAP_PX = 2
STRIP_LABEL_PX = 12
STRIP_BACKGROUND = (255, 255, 255)
STRIP_TEXT = (0, 0, 0)


# Suffixes of the files written here (the data's format, checked against the output name).
MP4_SUFFIXES = (".mp4",)
PNG_SUFFIXES = (".png",)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if (
        frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[-1] != 3
        or frames.shape[0] == 0
    ):
        raise InputError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype}"
                         f" {list(frames.shape)}")
    return frames


def check_mp4_output(path: str | os.PathLike[str]) -> Path:
    """Refuse an mp4 output path that :func:`write_mp4` could not write, before the frames are
    made."""
    return check_output(path, suffixes=MP4_SUFFIXES)


def auto_scale(height: int, width: int) -> int:
    """Smallest integer upscale that brings the short side to ``MIN_SIDE_PX`` (1 for frames that
    big)."""
    return max(1, math.ceil(MIN_SIDE_PX / min(height, width)))


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: float, *,
              scale: int | None = None,
              crf: int = DEFAULT_CRF, pix_fmt: PixelFormat = "yuv420p") -> Path:
    """Encode ``frames`` (uint8 ``[T, H, W, 3]``) as an H.264 mp4 at ``fps``; returns the path
    written.

    Every frame is written, none dropped or repeated.

    Args:
        scale: integer nearest-neighbour upscale before encoding (1 = none); None:
        :func:`auto_scale`. crf: x264 quality, 0 (lossless) to 51. pix_fmt: ``yuv420p`` plays
        everywhere; ``yuv444p`` keeps full colour resolution.
    """
    import av

    frames = _check_frames(frames)
    if scale is None:
        scale = auto_scale(frames.shape[1], frames.shape[2])
    if not isinstance(scale, int) or scale < 1:
        raise InputError(f"scale must be an int >= 1, got {scale!r}")
    if not 0 <= crf <= 51:
        raise InputError(f"crf must be in [0, 51], got {crf}")
    if pix_fmt not in ("yuv420p", "yuv444p"):
        raise InputError(f"pix_fmt must be 'yuv420p' or 'yuv444p', got {pix_fmt!r}")
    if fps <= 0:
        raise InputError(f"fps must be > 0, got {fps}")
    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise InputError(f"yuv420p needs even frame sizes, got {height}x{width} after scale "
                         f"{scale};"
                         " use an even scale or pix_fmt='yuv444p'")
    with atomic_path(path, suffixes=MP4_SUFFIXES) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = {"crf": str(crf)}
            for frame in frames:
                if scale > 1:
                    frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                         format="rgb24")
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode(None))
    return Path(path)


def read_mp4(path: str | os.PathLike[str], *, downscale: int = 1) -> np.ndarray:
    """Decode every frame of a video file: uint8 ``[T, H / downscale, W / downscale, 3]``.

    ``downscale`` averages ``downscale x downscale`` squares, undoing :func:`write_mp4`'s upscale.
    """
    import av

    source = Path(path)
    if not source.is_file():
        raise InputError(f"video file {source} does not exist")
    if not isinstance(downscale, int) or downscale < 1:
        raise InputError(f"downscale must be an int >= 1, got {downscale!r}")
    try:
        with av.open(str(source), mode="r") as container:
            if not container.streams.video:
                raise InputError(f"{source} has no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise InputError(f"cannot read {source} as a video: {err}") from err
    if not frames:
        raise InputError(f"{source} contains no video frames")
    video = np.stack(frames)
    if downscale == 1:
        return video
    t, h, w, c = video.shape
    if h % downscale or w % downscale:
        raise InputError(f"video size {h}x{w} is not divisible by downscale={downscale}")
    blocks = video.reshape(t, h // downscale, downscale, w // downscale, downscale, c)
    return np.rint(blocks.mean(axis=(2, 4), dtype=np.float32)).astype(np.uint8)


def write_png_strip(path: str | os.PathLike[str], rows: Sequence[np.ndarray],
                    labels: Sequence[str] | None = None, *, scale: int = 1) -> Path:
    """Save rows of frames side by side as one PNG, each row under an optional label.

    Args:
        rows: each a uint8 ``[T, H, W, 3]`` sequence of frames placed left to right, or one image
            ``[H, W, 3]`` (e.g. a panorama). Rows may differ in size; shorter ones are padded.
        labels: one text per row (or None for no labels).
        scale: integer nearest-neighbour upscale of every frame.
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise InputError("write_png_strip needs at least one row of frames")
    if labels is not None and len(labels) != len(rows):
        raise InputError(f"got {len(labels)} labels for {len(rows)} rows; give one label per row")
    if not isinstance(scale, int) or scale < 1:
        raise InputError(f"scale must be an int >= 1, got {scale!r}")
    images = [_row_image(np.asarray(row), scale) for row in rows]
    label_px = STRIP_LABEL_PX if labels is not None else 0
    width = max(img.shape[1] for img in images)
    height = sum(img.shape[0] + label_px + STRIP_GAP_PX for img in images) - STRIP_GAP_PX
    canvas = Image.new("RGB", (width, height), STRIP_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for i, img in enumerate(images):
        if labels is not None:
            draw.text((1, y), labels[i], fill=STRIP_TEXT)
        canvas.paste(Image.fromarray(img), (0, y + label_px))
        y += img.shape[0] + label_px + STRIP_GAP_PX
    with atomic_path(path, suffixes=PNG_SUFFIXES) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def _row_image(row: np.ndarray, scale: int) -> np.ndarray:
    """One strip row as uint8 ``[H, W_total, 3]``: frames left to right with white gaps."""
    if row.dtype != np.uint8 or row.ndim not in (3, 4) or row.shape[-1] != 3:
        raise InputError(f"a strip row must be uint8 [T, H, W, 3] or [H, W, 3],"
                         f" got {row.dtype} {list(row.shape)}")
    frames = row[None] if row.ndim == 3 else row
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    t, h, w, _ = frames.shape
    out = np.full((h, t * (w + STRIP_GAP_PX) - STRIP_GAP_PX, 3), STRIP_BACKGROUND, dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[:, i * (w + STRIP_GAP_PX): i * (w + STRIP_GAP_PX) + w] = frame
    return out
