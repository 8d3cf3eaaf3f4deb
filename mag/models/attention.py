"""Attention of the Wan DiT: frame-level masks, self-attention with a KV cache, cross-attention to text.

Masks are built at frame level (``[F_query, F_key]`` bool, True = may attend) and expanded to tokens
inside the model. ``F.scaled_dot_product_attention`` with a boolean token mask is fine at the sizes
this project trains (48 frames x 64 tokens = 3k tokens, a 9 MB mask) and at streaming time (one
block against the cache, usually no mask at all). Where it stops paying is long block-sparse
training sequences at Wan scale (e.g. 21 frames x 1560 tokens = 33k tokens: a 1 GB dense mask and
no skipping of masked tiles): there ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built
from the same frame mask (``mask_mod = frame_mask[q // T, k // T]``) skips whole masked blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mag.cache import KVCache, PendingWrite
from mag.models.layers import RMSNorm, apply_rotary

# ---------------------------------------------------------------------------------------------
# Frame-level masks (True = the query frame may attend to the key frame)


def block_causal_mask(num_frames: int, frames_per_block: int) -> Tensor:
    """Bidirectional inside a block, causal across blocks: ``[num_frames, num_frames]`` bool."""
    block = torch.arange(num_frames) // frames_per_block
    return block[None, :] <= block[:, None]


def sink_window_mask(num_frames: int, frames_per_block: int, sink_frames: int, window_frames: int) -> Tensor:
    """What :class:`mag.cache.WindowPolicy` streaming sees, as one full-sequence mask.

    A query in block ``b`` (first frame ``s = b * frames_per_block``) sees its own block, the
    ``sink_frames`` first frames, and the ``window_frames`` frames just before ``s``.
    """
    frames = torch.arange(num_frames)
    start = (frames // frames_per_block) * frames_per_block
    query_start, key = start[:, None], frames[None, :]
    same_block = start[None, :] == query_start
    earlier = key < query_start
    return same_block | (earlier & ((key < sink_frames) | (key >= query_start - window_frames)))


def last_frame_memory_mask(num_frames: int, frames_per_block: int, sink_frames: int = 0) -> Tensor:
    """What compressed-memory streaming (``downsample`` / ``mag``) sees, as one full-sequence mask.

    A query in block ``b`` sees its own block, the ``sink_frames`` first frames, and the last
    frame of every earlier block.
    """
    frames = torch.arange(num_frames)
    block = frames // frames_per_block
    is_last = frames % frames_per_block == frames_per_block - 1
    earlier = block[None, :] < block[:, None]
    return (block[None, :] == block[:, None]) | (earlier & ((frames < sink_frames) | is_last)[None, :])


def expand_frame_mask(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """``[Fq, Fk]`` frame mask -> ``[Fq * T, Fk * T]`` token mask (tokens of a frame are contiguous)."""
    return frame_mask.repeat_interleave(tokens_per_frame, dim=0).repeat_interleave(tokens_per_frame, dim=1)


# ---------------------------------------------------------------------------------------------
# Cross-attention cache


@dataclass(frozen=True)
class CrossAttentionCache:
    """Per-layer cross-attention keys and values of one prompt batch, computed once per prompt.

    Attributes:
        k, v: ``[layers, B, heads, L_text, head_dim]`` (keys already RMS-normalised).
    """

    k: Tensor
    v: Tensor

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


# ---------------------------------------------------------------------------------------------
# Attention modules (parameter names follow the original Wan2.1: q, k, v, o, norm_q, norm_k)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, H * D] -> [B, H, N, D]``."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Self-attention with RMS qk-norm over the full width and 3D RoPE, optionally over a KV cache."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: Tensor | None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        pending: PendingWrite | None = None,
    ) -> Tensor:
        """Attend the current tokens to ``[valid cached tokens ; current tokens]``.

        Args:
            x: ``[B, N, dim]`` current tokens (frame-major).
            rope: ``(cos, sin)`` ``[N, head_dim / 2]`` for the current tokens.
            attn_mask: ``[N, N_cached + N]`` bool token mask or None (attend to everything).
            kv_cache: read (and, with ``pending``, written) at index ``layer``.
        Returns:
            ``[B, N, dim]``.
        """
        cos, sin = rope
        q = apply_rotary(_heads(self.norm_q(self.q(x)), self.num_heads), cos, sin)
        k = apply_rotary(_heads(self.norm_k(self.k(x)), self.num_heads), cos, sin)
        v = _heads(self.v(x), self.num_heads)
        keys, values = k, v
        if kv_cache is not None:
            cached_k, cached_v = kv_cache.read(layer)
            if cached_k.shape[2]:
                keys = torch.cat([cached_k.to(k.dtype), k], dim=2)
                values = torch.cat([cached_v.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
        if kv_cache is not None and pending is not None:
            kv_cache.write(layer, k, v, pending)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention from video tokens (queries) to text tokens (keys/values), RMS qk-norm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, heads, L, head_dim]`` of embedded text ``context: [B, L, dim]``."""
        return _heads(self.norm_k(self.k(context)), self.num_heads), _heads(self.v(context), self.num_heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``x: [B, N, dim]`` attends to ``k, v: [B, heads, L, head_dim]``; returns ``[B, N, dim]``."""
        q = _heads(self.norm_q(self.q(x)), self.num_heads)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(out.transpose(1, 2).flatten(2))


__all__ = ["CrossAttention", "CrossAttentionCache", "SelfAttention", "block_causal_mask", "expand_frame_mask",
           "last_frame_memory_mask", "sink_window_mask"]
