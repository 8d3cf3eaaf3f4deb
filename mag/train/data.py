"""Training batches from the panorama world: infinite procedural clips, reproducible per step;
the recipe's data source and where its text states come from (an encoder, or the shards).

Every batch is a pure function of ``(seed, step, micro_batch)``: nothing about the data stream needs
to be checkpointed, and a resumed run sees exactly the clips the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mag.codecs.base import frames_to_tensor
from mag.config import Preset
from mag.data import PromptFileSource
from mag.data.shards import LatentShardSource
from mag.errors import ConfigError
from mag.text import PROMPT_TABLE_ENV, PromptEmbeddingCache, prompt_cache
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


def text_inputs(preset: Preset, data: DataConfig,
                source: ClipSource) -> tuple[PromptEmbeddingCache | None, Tensor]:
    """The prompt cache (``None`` where the shards carry the text states: no encoder is built) and
    the empty prompt's states ``[1, L, text_dim]`` (stored by ``mag data encode``, or encoded)."""
    if isinstance(source, LatentShardSource) and source.has_context:
        if source.text_encoder != preset.text_encoder:
            raise ConfigError(f"{source.folder} holds {source.text_encoder} text states; the "
                              f"preset's text encoder is {preset.text_encoder}")
        empty = source.empty_context()
        expected = (preset.text_max_tokens, preset.dit.text_dim)
        found = tuple(empty.shape[-2:])
        if found != expected:
            raise ConfigError(f"{source.folder} holds text states of shape {found}; the preset "
                              f"needs {expected} (text_max_tokens, dit.text_dim)")
        return None, empty
    check_text_encoder(preset, data)
    text = prompt_cache(preset.text_encoder, data.text_mode, data.text_encoder_path)
    return text, text.get([""])


def check_text_encoder(preset: Preset, data: DataConfig) -> None:
    """Refuse, before anything is allocated, a UMT5 run with neither stored text nor weights."""
    if preset.text_encoder != "umt5" or data.text_encoder_path or os.environ.get(PROMPT_TABLE_ENV):
        return
    if data.source == "shards":
        raise ConfigError(f"{data.shards} carries no text states and data.text_encoder_path is "
                          "empty: run `mag data encode --text-encoder umt5` or set the path")
    raise ConfigError("data.text_encoder_path is empty: the umt5 text encoder needs its weights "
                      "(a Wan2.1 folder or its UMT5 file)")
