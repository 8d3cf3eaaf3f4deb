"""Rotary-embedding arithmetic shared by the model and the cache: the axis split, the inverse
frequencies and the pair rotation.

The model (:mod:`mag.models.layers`) rotates queries and keys once; the archive cache
(:mod:`mag.cache.archive`) rotates stored keys again by a temporal shift at read time. Both use
these functions, so a key rotated at ``p`` and shifted by ``d`` equals the key rotated at ``p + d``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head width between the (time, height, width) rotary axes, as Wan does it."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def inverse_frequencies(axis_dim: int, theta: float, device: torch.device | str | None = None
                        ) -> Tensor:
    """``[axis_dim / 2]`` float64 inverse frequencies ``theta^(-2i / axis_dim)`` of one axis."""
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
    return 1.0 / theta ** exponents


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` by full-width tables (``cos`` repeated
    per pair, ``sin`` signed ``-sin, +sin``): ``x * cos + swap(x) * sin`` in float32 by promotion,
    cast back to ``x``'s dtype."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x * cos + swapped * sin).type_as(x)


def full_width_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Half-width angles' ``cos, sin [..., N, D/2]`` -> the full-width float32 tables of
    :func:`rotate_pairs` ``[..., N, D]``."""
    cos, sin = cos.float(), sin.float()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def temporal_shift_tables(shifts: Tensor, tokens_per_frame: int, head_dim: int, theta: float
                          ) -> tuple[Tensor, Tensor]:
    """Tables rotating keys by ``shifts: [B, N]`` frames along the time axis only (height and width
    pairs untouched): full-width ``cos, sin [B, N * tokens_per_frame, head_dim]``."""
    time_dim, height_dim, width_dim = rope_axis_dims(head_dim)
    angles = shifts.double()[..., None] * inverse_frequencies(time_dim, theta, shifts.device)
    still = angles.new_zeros(*angles.shape[:-1], (height_dim + width_dim) // 2)
    half = torch.cat([angles, still], dim=-1).repeat_interleave(tokens_per_frame, dim=-2)
    return full_width_tables(half.cos(), half.sin())
