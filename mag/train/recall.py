"""The recall signal: is the loss lower where the model has seen the view before, long ago?

Every pixel column of every training frame shows a known panorama column, so each is ``new`` (never
in the context), ``recent`` (last shown within ``window_frames`` frames) or ``recall`` (shown longer
ago: only long-term memory helps); only earlier blocks count as context. Training works when
``loss_recall / loss_new`` falls clearly below 1. docs/recall.md, "The recall signal during
training".
"""

from __future__ import annotations

import torch
from torch import Tensor

NEW, RECENT, RECALL = 0, 1, 2
CATEGORY_NAMES = ("new", "recent", "recall")


def view_categories(offsets: Tensor, frame_width: int, panorama_width: int, frames_per_block: int,
                    window_frames: int) -> Tensor:
    """Category of each pixel column, ``[B, F, frame_width]`` (long), from camera offsets ``[B,
    F]``.

    Column ``x`` of frame ``t`` shows panorama column ``floor(offset_t + x) mod panorama_width``; it
    was visible in an earlier frame ``s`` when that column lies inside frame ``s``'s window.
    """
    batch, frames = offsets.shape
    cols = torch.arange(frame_width, device=offsets.device)
    start = torch.floor(offsets).long()
    shown = (start[:, :, None] + cols) % panorama_width                     # [B, F, W]
    # visible[b, t, x, s]: column shown at (t, x) lies inside frame s's window
    rel = (shown[:, :, :, None] - start[:, None, None, :]) % panorama_width  # [B, F, W, F]
    visible = rel < frame_width
    frame = torch.arange(frames, device=offsets.device)
    block_start = (frame // frames_per_block) * frames_per_block
    # [F(t), F(s)] s in context of t
    context = frame[None, :] < block_start[:, None]
    seen = visible & context[None, :, None, :]
    last = torch.where(seen, frame.expand_as(seen), torch.full_like(seen, -1,
                                                                    dtype=torch.long)).amax(-1)
    gap = frame[None, :, None] - last
    category = torch.full_like(last, NEW)
    category[(last >= 0) & (gap <= window_frames)] = RECENT
    category[(last >= 0) & (gap > window_frames)] = RECALL
    return category


def category_losses(per_element: Tensor, categories: Tensor) -> dict[str, Tensor]:
    """Mean loss per category from ``per_element: [B, F, C, H, W]`` and ``categories: [B, F, W]``.

    Returns 0-dim tensors (NaN where a category is absent), to be read on the host only when logged.
    """
    per_column = per_element.mean(dim=(2, 3))                                # [B, F, W]
    out = {}
    for index, name in enumerate(CATEGORY_NAMES):
        mask = categories == index
        count = mask.sum()
        out[name] = torch.where(count > 0, (per_column * mask).sum() / count.clamp_min(1),
                                torch.tensor(float("nan")))
    return out
