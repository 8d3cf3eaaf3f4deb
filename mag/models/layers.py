"""Small building blocks of the Wan2.1 DiT: fp32 norms, timestep embedding, 3D rotary embedding.

Wan computes every norm, the modulation and the rotary embedding in float32 even when the
weights run in bf16; these helpers do the same so a bf16 model matches the original numerics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mag.cache.rotary import full_width_tables, inverse_frequencies, rope_axis_dims, rotate_pairs

# Base of the sinusoidal timestep embedding (the same constant as Transformer position encodings).
TIMESTEP_MAX_PERIOD = 10000.0


class RMSNorm(nn.Module):
    """RMS norm over the last axis, computed in float32 then cast back (Wan's ``WanRMSNorm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 (Wan's ``WanLayerNorm``); affine only where Wan has
    weights."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def linear_float32(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in float32 whatever the weights' dtype (Wan runs these layers under
    autocast(float32))."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class Float32Sequential(nn.Sequential):
    """An ``nn.Sequential`` of Linears and activations evaluated in float32 (the time embedding and
    projection: Wan asserts both are float32, so a bf16 model's modulation is not rounded to
    bf16)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        for layer in self:
            x = linear_float32(layer, x) if isinstance(layer, nn.Linear) else layer(x)
        return x


def sinusoidal_embedding(timestep: Tensor, dim: int) -> Tensor:
    """Wan's timestep embedding: ``[cos(t w_i), sin(t w_i)]`` with ``w_i = 10000^(-i / (dim/2))``.

    Computed in float64 as the original does (t reaches 1000, so float32 angles lose ~1e-4).

    Args:
        timestep: any shape ``[...]`` of timesteps in [0, 1000].
    Returns:
        ``[..., dim]`` float32.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float64, device=timestep.device) / half
    freqs = torch.pow(TIMESTEP_MAX_PERIOD, -exponent)
    angles = timestep.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


class RotaryEmbedding3D(nn.Module):
    """3D RoPE: the head width is split into time / height / width parts, each rotated by its own
    index.

    The time index is an explicit per-frame position (absolute latent-frame index), so a frame
    written into the KV cache keeps its position; height and width indices are ``arange``.
    Channel pairs are interleaved ``(x[2i], x[2i+1])`` as in Wan and diffusers.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.axis_pairs = tuple(d // 2 for d in rope_axis_dims(head_dim))
        # Non-persistent: checkpoints never carry them; init_weights() recomputes after to_empty().
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        if self.cos.device.type != "meta":
            self.reset_parameters()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding3D:
        """Follow the model's device moves but not its dtype casts: the tables stay float32, so a
        bf16 model rotates in float32 as Wan does (``model.to(torch.bfloat16)`` would round cos/sin
        to bf16)."""
        tables = {"cos": self.cos, "sin": self.sin}
        super()._apply(fn, recurse)
        for name, table in tables.items():
            moved = getattr(self, name)
            if moved.dtype != table.dtype:
                setattr(self, name, table.to(device=moved.device))
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        positions = torch.arange(self.max_positions, dtype=torch.float64, device=self.cos.device)
        table = torch.cat([torch.outer(positions, self._inverse_frequencies(axis_dim,
                                                                            self.cos.device))
                           for axis_dim in rope_axis_dims(self.head_dim)], dim=1)
        self.cos.copy_(table.cos())
        self.sin.copy_(table.sin())

    def forward(self, frame_positions: Tensor, height: int, width: int,
                width_offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Angles for a ``[F, height, width]`` token grid in (frame, row, column) order.

        Args:
            frame_positions: ``[F]`` long, absolute temporal index of each frame. width_offsets:
            optional ``[B, F]`` float, added to each frame's column indices (in patches).
                Camera-anchored RoPE: with the camera's horizontal position here, a column's width
                index is its *world* column, so a view seen long ago sits at the same position when
                revisited. Fractional offsets are exact (angles are computed, not looked up).
        Returns:
            ``(cos, sin)``, each ``[F * height * width, head_dim / 2]`` float32, or ``[B, F * height
            * width, head_dim / 2]`` with ``width_offsets``.
        """
        frames = frame_positions.shape[0]
        grid_shape = (frames, height, width, -1)
        t_cos, h_cos, w_cos = self.cos.split(self.axis_pairs, dim=1)
        t_sin, h_sin, w_sin = self.sin.split(self.axis_pairs, dim=1)
        if width_offsets is None:
            w_cos_grid = w_cos[:width].view(1, 1, width, -1).expand(grid_shape)
            w_sin_grid = w_sin[:width].view(1, 1, width, -1).expand(grid_shape)
        else:
            batch = width_offsets.shape[0]
            columns = width_offsets.double()[:, :, None] + torch.arange(width,
                                                                        device=width_offsets.device)
            # [B, F, W, pairs]
            angles = columns[..., None] * self.width_inv_freq(columns.device)
            grid_shape = (batch, frames, height, width, -1)
            w_cos_grid = angles.cos().float()[:, :, None].expand(grid_shape)
            w_sin_grid = angles.sin().float()[:, :, None].expand(grid_shape)
        out = []
        for t_part, h_part, w_grid in ((t_cos, h_cos, w_cos_grid), (t_sin, h_sin, w_sin_grid)):
            grid = torch.cat([
                t_part[frame_positions].view(frames, 1, 1, -1).expand(grid_shape),
                h_part[:height].view(1, height, 1, -1).expand(grid_shape),
                w_grid,
            ], dim=-1)
            out.append(grid.reshape(*grid_shape[:-4], frames * height * width, -1))
        return out[0], out[1]

    def width_inv_freq(self, device: torch.device | None = None) -> Tensor:
        """Inverse frequencies of the width axis (float64), as in the tables, built on ``device``
        (no copy: a host-to-device copy per forward would sync the stream)."""
        return self._inverse_frequencies(rope_axis_dims(self.head_dim)[2], device)

    def _inverse_frequencies(self, axis_dim: int, device: torch.device | None) -> Tensor:
        return inverse_frequencies(axis_dim, self.theta, device)


def rotation_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Full-width float32 tables for :func:`apply_rotary`, built once per forward from the
    half-width angles ``[..., N, D/2]``: ``cos`` repeated per channel pair, and ``sin`` with the
    sign of each pair's slot (``-sin`` on the even channel, ``+sin`` on the odd one), each ``[...,
    N, D]``."""
    return full_width_tables(cos, sin)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` of ``x: [B, H, N, D]`` by the tables of
    :func:`rotation_tables` (``[N, D]``, or ``[B, N, D]`` for per-sample camera-anchored angles).

    ``x * cos + swap(x) * sin``, with ``swap`` exchanging the two channels of each pair, is value
    for value the textbook ``(x1 cos - x2 sin, x1 sin + x2 cos)`` (negation is exact, addition
    commutes) in 5 kernels instead of 8; the products run in float32 by type promotion (GPU kernels
    cast ``x`` as they load).
    """
    if cos.dim() == 3:  # per-sample angles (camera-anchored RoPE): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return rotate_pairs(x, cos, sin)


def modulate(normed: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``norm(x) * (1 + scale) + shift`` in float32 (shift/scale broadcast per
    frame).

    ``scale`` is float32, so type promotion computes in float32 without a separate
    ``normed.float()`` copy.
    """
    return normed * (1 + scale.float()) + shift


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """``x + y * gate`` in float32 (``gate`` is float32; promotion casts ``x``, ``y`` inside the
    kernels)."""
    return x + y * gate.float()


def init_linear_xavier(module: nn.Module) -> None:
    """Wan's default init: Xavier-uniform weights and zero biases for every Linear below
    ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = ["FP32LayerNorm", "Float32Sequential", "RMSNorm", "RotaryEmbedding3D", "apply_rotary",
           "gated_residual", "init_linear_xavier", "linear_float32", "modulate", "rope_axis_dims",
           "rotation_tables", "sinusoidal_embedding"]
