"""``mag data encode``: mp4 files + captions -> latent shards (VAE latents, text-encoder states).

The captions file is a CSV with a header naming the columns ``video`` (a path relative to
VIDEOS_DIR) and ``caption``. Each video contributes its first ``codec.video_frames(--frames)``
frames at their stored size (no resizing; the size must divide by the codec's compression). Every
input is checked before anything is written; an interrupted run resumes at its first missing shard.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import safe_open
from tqdm.auto import tqdm

from mag.codecs import Codec, frames_to_tensor, get_codec
from mag.data.shards import (
    INDEX_FILE,
    read_index,
    shard_name,
    write_empty_context,
    write_index,
    write_shard,
)
from mag.errors import InputError
from mag.io.cli import add_out_argument, add_runtime_arguments, set_threads
from mag.io.video import read_mp4
from mag.text import TextEncoder, get_text_encoder

DEFAULT_SHARD_SIZE = 64
CSV_COLUMNS = ("video", "caption")


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str


def read_captions(videos_dir: str | Path, captions_csv: str | Path) -> list[Clip]:
    """Rows of the captions CSV with existing video files; InputError naming the first problem."""
    videos_dir, captions_csv = Path(videos_dir), Path(captions_csv)
    if not videos_dir.is_dir():
        raise InputError(f"videos folder {videos_dir} does not exist")
    try:
        with captions_csv.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read captions file {captions_csv}: {err}") from err
    if not rows or any(column not in rows[0] for column in CSV_COLUMNS):
        raise InputError(f"{captions_csv} needs a header with columns {', '.join(CSV_COLUMNS)} "
                         "and at least"
                         " one row")
    clips = [Clip(videos_dir / row["video"], (row["caption"] or "").strip()) for row in rows]
    missing = [str(c.video) for c in clips if not c.video.is_file()]
    if missing:
        raise InputError(f"{len(missing)} video file(s) of {captions_csv} not found, e.g. "
                         f"{missing[0]}")
    return clips


def encode_clip(codec: Codec, path: Path, frames: int, device: torch.device) -> torch.Tensor:
    """Latents ``[frames, C, h, w]`` of the first ``codec.video_frames(frames)`` frames of one
    mp4."""
    video = read_mp4(path)
    needed = codec.video_frames(frames)
    if video.shape[0] < needed:
        raise InputError(f"{path} has {video.shape[0]} frames; {frames} latent frames need "
                         f"{needed}")
    pixels = frames_to_tensor(video[:needed])[None].to(device)
    with torch.no_grad():
        return codec.encode(pixels)[0].float().cpu()


def encode_videos(videos_dir: str | Path, captions_csv: str | Path, out: str | Path, *, frames: int,
                  codec: Codec, codec_name: str, text: TextEncoder | None = None,
                  text_name: str = "none",
                  shard_size: int = DEFAULT_SHARD_SIZE, device: torch.device | str = "cpu",
                  progress: bool = True) -> Path:
    """Write (or complete) the shard folder ``out``; returns it."""
    if frames < 1 or shard_size < 1:
        raise InputError(f"--frames and --shard-size must be >= 1, got {frames} and {shard_size}")
    clips = read_captions(videos_dir, captions_csv)
    out, device = Path(out), torch.device(device)
    info = {"frames": frames, "codec": codec_name, "text_encoder": text_name, "clips": len(clips),
            "shard_size": shard_size}
    if (out / INDEX_FILE).is_file():
        stored = read_index(out)
        changed = [k for k, v in info.items() if stored.get(k) != v]
        if changed:
            raise InputError(f"{out} was written with other settings ({', '.join(changed)} "
                             "differ); choose"
                             " another output folder")
    out.mkdir(parents=True, exist_ok=True)
    if text is not None:  # the empty prompt (CFG, history loss): stored once, read by training
        info["empty_context"] = write_empty_context(out, text.encode([""]).float().cpu())
    counts: list[int] = []
    bar = tqdm(total=len(clips), desc="encode", unit="clip", disable=not progress)
    for k in range(math.ceil(len(clips) / shard_size)):
        part = clips[k * shard_size:(k + 1) * shard_size]
        if (out / shard_name(k)).is_file():  # written by an earlier sitting
            with safe_open(str(out / shard_name(k)), framework="pt") as f:
                counts.append(f.get_slice("latents").get_shape()[0])
            bar.update(len(part))
            continue
        latents = []
        for clip in part:
            latents.append(encode_clip(codec, clip.video, frames, device))
            bar.update(1)
        prompts = [clip.caption for clip in part]
        context = text.encode(prompts).float().cpu() if text is not None else None
        write_shard(out, k, torch.stack(latents), prompts, [clip.video.name for clip in part],
                    context)
        counts.append(len(part))
        info["latent_shape"] = list(latents[0].shape[1:])
        write_index(out, counts, info)
    bar.close()
    write_index(out, counts, {**info, "latent_shape": _latent_shape(out)})
    return out


def _latent_shape(out: Path) -> list[int]:
    with safe_open(str(out / shard_name(0)), framework="pt") as f:
        return list(f.get_slice("latents").get_shape()[2:])


# ------------------------------------------------------------------------------ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare training data (latent shards of real "
                                              "videos)",
                                 description="Data preparation for training at Wan scale.")
    tools = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    enc = tools.add_parser("encode", help="mp4 files + captions CSV -> VAE latent shards "
                                          "(resumable)",
                           description=__doc__.split("\n\n")[0])
    enc.add_argument("videos", help="folder of the mp4 files")
    enc.add_argument("captions", help="CSV with columns video (relative path) and caption")
    add_out_argument(enc, "shard folder (created; resumed if present)")
    enc.add_argument("--frames", type=int, required=True, help="latent frames per clip")
    enc.add_argument("--codec", default="wan-vae", help="codec name (default %(default)s)")
    enc.add_argument("--vae", default=None, help="VAE weights (Wan2.1_VAE.pth or a diffusers "
                                                 "folder)")
    enc.add_argument("--vae-tiny", action="store_true", help="a tiny random VAE (tests)")
    enc.add_argument("--text-encoder", default="none", choices=("none", "minilm", "umt5"),
                     help="store text-encoder states of the captions (default: captions only)")
    enc.add_argument("--text-encoder-path", default=None, help="UMT5 weights folder for "
                                                               "--text-encoder umt5")
    enc.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="clips per shard")
    add_runtime_arguments(enc)  # --device of the VAE and text encoder, --threads
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    enc.set_defaults(func=_encode)


def _encode(args: argparse.Namespace) -> int:
    read_captions(args.videos, args.captions)  # refuse bad input before loading any weights
    set_threads(args.threads)
    kwargs = {"path": args.vae} if args.vae else {"tiny": True} if args.vae_tiny else {}
    codec = get_codec(args.codec,
                      **kwargs).to(args.device) if args.codec != "pixel" else get_codec("pixel")
    text = None
    if args.text_encoder == "umt5":
        text = get_text_encoder("umt5", path=args.text_encoder_path).to(args.device)
    elif args.text_encoder == "minilm":
        text = get_text_encoder("minilm").to(args.device)
    out = encode_videos(args.videos, args.captions, args.out, frames=args.frames, codec=codec,
                        codec_name=args.codec, text=text, text_name=args.text_encoder,
                        shard_size=args.shard_size, device=args.device,
                        progress=not args.no_progress)
    index = read_index(out)
    print(f"wrote {out}: {index['clips']} clips of {args.frames} latent frames in "
          f"{len(index['shards'])}"
          " shard(s)")
    return 0
