"""``mag train ode-pairs``: sample the teacher's guided ODE on world-clip prompts (the ``ode``
step's data).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mag.errors import CheckpointError, InputError
from mag.objectives.ode import (
    ODEPairs,
    few_step_indices,
    sample_ode_trajectory,
)
from mag.registry import load_model
from mag.schedulers import FlowMatchScheduler
from mag.text import prompt_cache
from mag.train.data import WorldClipSource
from mag.train.recipe import recipe_from_dict
from mag.train.steps.base import sample_generator


def make_ode_pairs(teacher: str, num_clips: int, *, num_steps: int, guidance_scale: float,
                   seed: int = 0,
                   frames: int | None = None, batch_size: int = 8,
                   device: torch.device | str = "cpu", progress: bool = True) -> ODEPairs:
    """Sample the teacher's guided ODE on the prompts (and camera tracks) of ``num_clips`` world
    clips.

    The world, text mode and clip length come from the teacher's training recipe (``frames``
    overrides the length); clip ``i``'s prompt and its initial noise come from generators keyed by
    ``(seed, 0, 0, i)``, so a file is reproducible and its first clips do not depend on
    ``num_clips``. Returns pairs for :func:`mag.objectives.ode.save_ode_pairs` (see that module for
    the layout).
    """
    from tqdm.auto import tqdm

    model, preset, meta = load_model(teacher, device)
    if not isinstance(meta.get("recipe"), dict) or "name" not in meta["recipe"]:
        raise CheckpointError(f"teacher {teacher!r} carries no training recipe (it gives the "
                              "world, text mode"
                              " and clip length of the pairs); export it from a training run")
    if num_clips < 1 or batch_size < 1:
        raise InputError(f"--clips and the batch size must be >= 1, got {num_clips} and "
                         f"{batch_size}")
    data = recipe_from_dict(meta["recipe"]).data
    if frames is not None:
        data = dataclasses.replace(data, clip_frames=frames)
    data.validate(preset.cache.frames_per_block)
    scheduler = FlowMatchScheduler(preset.scheduler, preset.dit.prediction)
    # refuse a step count off the few-step levels before sampling
    few_step_indices(scheduler, num_steps)
    source = WorldClipSource(preset, data, seed)
    text = prompt_cache(preset.text_encoder, data.text_mode)
    empty = text.get([""]).to(device)
    frame_shape = (preset.dit.in_channels, preset.video.latent_height, preset.video.latent_width)
    parts: dict[str, list[Tensor]] = {name: [] for name in ("trajectory", "x0", "context",
                                                            "offsets", "camera_px")}
    prompts: list[str] = []
    starts = range(0, num_clips, batch_size)
    for start in tqdm(starts, desc="ode pairs", unit="batch", disable=not progress):
        indices = range(start, min(start + batch_size, num_clips))
        clips = source.batch(0, 0, indices)
        noise = torch.stack([torch.randn((data.clip_frames, *frame_shape),
                                         generator=sample_generator(seed, 0, 0,
                                                                    i)) for i in indices])
        context = text.get(clips.prompts).to(device)
        offsets = (
            (clips.camera_px / preset.dit.patch_size[2]).to(device)
            if preset.dit.camera_rope
            else None
        )
        trajectory, x0 = sample_ode_trajectory(model, scheduler, noise.to(device), context,
                                               empty.expand_as(context), num_steps,
                                               guidance_scale=guidance_scale, width_offsets=offsets)
        for name, value in (("trajectory", trajectory), ("x0", x0), ("context", context),
                            ("offsets", clips.offsets), ("camera_px", clips.camera_px)):
            parts[name].append(value.cpu())
        prompts.extend(clips.prompts)
    metadata = {"teacher": str(teacher), "preset": preset.to_dict(), "prompts": prompts,
                "steps": num_steps,
                "guidance_scale": guidance_scale, "seed": seed, "world": data.world,
                "text_mode": data.text_mode}
    return ODEPairs(trajectory=torch.cat(parts["trajectory"]), x0=torch.cat(parts["x0"]),
                    context=torch.cat(parts["context"]), timesteps=scheduler.few_step_timesteps(),
                    offsets=torch.cat(parts["offsets"]),
                    camera_px=torch.cat(parts["camera_px"]) if preset.dit.camera_rope else None,
                    metadata=metadata).validate()
