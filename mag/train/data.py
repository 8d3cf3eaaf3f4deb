"""Training batches from the panorama world: infinite procedural clips, reproducible per step.

Every batch is a pure function of ``(seed, step, micro_batch)``: nothing about the data stream needs
to be checkpointed, and a resumed run sees exactly the clips the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mag.codecs.base import frames_to_tensor
from mag.config import Preset
from mag.data import PromptFileSource
from mag.data.shards import LatentShardSource
from mag.train.recipe import DataConfig, LoopConfig
from mag.world import WorldConfig, camera_track, get_world_config, sample_clip


@dataclass
class ClipBatch:
    """``video``: float ``[B, F, 3, H, W]`` in [-1, 1]; ``offsets``: float ``[B, F]`` camera
    positions on the cylinder (wrapping); ``camera_px``: float ``[B, F]`` unwrapped camera track
    relative to frame 0."""

    video: Tensor
    offsets: Tensor
    camera_px: Tensor
    prompts: list[str]


def preset_world(preset: Preset, overrides: dict[str, Any] | None = None,
                 name: str = "default") -> WorldConfig:
    """World ``name`` with frames at the preset's video size and blocks of its block size;
    ``overrides`` (e.g. a recipe's ``data.world``) win. The panorama is as high as the frame unless
    they say otherwise. Training and the benchmark both build their worlds here, so they agree on
    the geometry."""
    merged = {"frame_height": preset.video.height, "frame_width": preset.video.width,
              "block_frames": preset.cache.frames_per_block, **(overrides or {})}
    merged.setdefault("pano_height", merged["frame_height"])
    return get_world_config(name, **merged)


class WorldClipSource:
    """Draws ``ClipBatch``es of ``data.clip_frames`` frames from train-split worlds."""

    def __init__(self, preset: Preset, data: DataConfig, seed: int) -> None:
        self.world = preset_world(preset, data.world)
        self.num_frames = data.clip_frames
        self.seed = seed

    def batch(self, step: int, micro: int, indices: range) -> ClipBatch:
        """Clips ``indices`` of micro-batch ``micro`` of ``step``; each clip depends only on its own
        index, so data-parallel ranks can take disjoint slices of the same global batch."""
        clips = [sample_clip(np.random.default_rng([self.seed, step, micro, i]), self.num_frames,
                             self.world)
                 for i in indices]
        video = torch.stack([frames_to_tensor(c.frames) for c in clips])
        offsets = torch.from_numpy(np.stack([c.offsets for c in clips]).astype(np.float32))
        camera = torch.from_numpy(np.stack([camera_track(c.velocities) for c in clips]))
        return ClipBatch(video=video, offsets=offsets, camera_px=camera,
                         prompts=[c.prompt for c in clips])


ClipSource = WorldClipSource | PromptFileSource | LatentShardSource


def clip_source(preset: Preset, data: DataConfig, loop: LoopConfig) -> ClipSource:
    """The recipe's data (``data.source``): world clips, prompts from a file, or latent shards."""
    if data.source == "prompts":
        return PromptFileSource(data.prompts, data.clip_frames, loop.seed)
    if data.source == "shards":
        return LatentShardSource(data.shards, data.clip_frames, loop.seed,
                                 loop.batch_size // loop.grad_accum, loop.grad_accum)
    return WorldClipSource(preset, data, loop.seed)
