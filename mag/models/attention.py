"""Attention of the Wan DiT: frame-level masks, self-attention with a KV cache, cross-attention to
text.

Masks are frame-level (``[F_query, F_key]`` bool, True = may attend), turned into one
:class:`AttentionMask` per forward and shared by all layers. Two execution paths give the same
result: ``dense`` (SDPA with a token mask) and ``grouped`` (default on CPU: query frames with
identical mask rows attend only to the key frames they may see). When each pays, and flex attention
at Wan scale: docs/performance.md, "Attention paths".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mag.cache import KVCache, PendingWrite
from mag.errors import InputError
from mag.models.layers import RMSNorm, apply_rotary

# ---------------------------------------------------------------------------------------------
# Frame-level masks (True = the query frame may attend to the key frame)


def block_causal_mask(num_frames: int, frames_per_block: int) -> Tensor:
    """Bidirectional inside a block, causal across blocks: ``[num_frames, num_frames]`` bool."""
    block = torch.arange(num_frames) // frames_per_block
    return block[None, :] <= block[:, None]


def sink_window_mask(num_frames: int, frames_per_block: int, sink_frames: int,
                     window_frames: int) -> Tensor:
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
    return (block[None, :] == block[:, None]) | (earlier & ((frames < sink_frames) | is_last)[None,
                                                                                              :])


def expand_frame_mask(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """``[Fq, Fk]`` frame mask -> ``[Fq * T, Fk * T]`` token mask (tokens of a frame are
    contiguous)."""
    rows = frame_mask.repeat_interleave(tokens_per_frame, dim=0)
    return rows.repeat_interleave(tokens_per_frame, dim=1)


# A run of token indices: a slice when contiguous (a view, no copy), else an index tensor (a
# gather).
TokenIndex = slice | Tensor


def _token_index(frames: list[int], tokens_per_frame: int, device: torch.device) -> TokenIndex:
    if frames == list(range(frames[0], frames[0] + len(frames))):
        return slice(frames[0] * tokens_per_frame, (frames[0] + len(frames)) * tokens_per_frame)
    tokens = torch.arange(tokens_per_frame)
    return torch.cat([f * tokens_per_frame + tokens for f in frames]).to(device, non_blocking=True)


def _take(x: Tensor, index: TokenIndex) -> Tensor:
    """Tokens ``index`` of ``x: [B, H, N, D]``."""
    return x[:, :, index] if isinstance(index, slice) else x.index_select(2, index)


@dataclass(frozen=True)
class AttentionMask:
    """A frame mask prepared once per forward for every layer (see the module docstring).

    Attributes:
        dense: ``[Nq, Nk]`` bool token mask (dense path) or None. groups: (query tokens, key tokens)
        per group of query frames with identical mask rows. order: permutation putting the
        concatenated group outputs back in query order (None: already).
    """

    dense: Tensor | None = None
    groups: tuple[tuple[TokenIndex, TokenIndex], ...] = ()
    order: Tensor | None = None

    @classmethod
    def from_frame_mask(cls, frame_mask: Tensor, tokens_per_frame: int, device: torch.device,
                        grouped: bool) -> AttentionMask:
        """Build the dense or grouped form of ``frame_mask: [Fq, Fk]`` (grouped reads it on the
        host)."""
        if not grouped:
            return cls(dense=expand_frame_mask(frame_mask.to(device, non_blocking=True),
                                               tokens_per_frame))
        rows = frame_mask.cpu().tolist()
        by_row: dict[tuple[bool, ...], list[int]] = {}
        for q, row in enumerate(rows):
            if not any(row):
                raise InputError(f"frame_mask row {q} lets query frame {q} attend to no key frame")
            by_row.setdefault(tuple(row), []).append(q)
        groups, query_frames = [], []
        for row, queries in by_row.items():
            keys = [k for k, ok in enumerate(row) if ok]
            groups.append((_token_index(queries, tokens_per_frame, device),
                           _token_index(keys, tokens_per_frame, device)))
            query_frames.extend(queries)
        order = None
        if query_frames != sorted(query_frames):
            position = torch.empty(len(query_frames), dtype=torch.long)
            position[torch.tensor(query_frames)] = torch.arange(len(query_frames))
            tokens = torch.arange(tokens_per_frame)
            order = (position[:, None] * tokens_per_frame + tokens).flatten().to(device,
                                                                                 non_blocking=True)
        return cls(groups=tuple(groups), order=order)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
    """Scaled dot-product attention of ``q: [B, H, Nq, D]`` over ``k, v: [B, H, Nk, D]`` under
    ``mask``."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if mask.dense is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    outs = [F.scaled_dot_product_attention(_take(q, qi), _take(k, ki), _take(v, ki))
            for qi, ki in mask.groups]
    out = torch.cat(outs, dim=2)
    return out if mask.order is None else out.index_select(2, mask.order)


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


class AttentionProjections(nn.Module):
    """The q / k / v / o projections and RMS qk-norms (over the full width) both attentions
    share."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(AttentionProjections):
    """Self-attention with RMS qk-norm and 3D RoPE, optionally over a KV cache."""

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Post-RoPE ``q, k`` and ``v`` ``[B, heads, N, head_dim]`` of ``x: [B, N, dim]``.

        Everything before the cache, a pure function of its inputs with fixed shapes per block, so
        it can be compiled (``mag bench speed --compile``) while :meth:`attend_cached` stays eager.
        """
        q = apply_rotary(_heads(self.norm_q(self.q(x)), self.num_heads), cos, sin)
        k = apply_rotary(_heads(self.norm_k(self.k(x)), self.num_heads), cos, sin)
        return q, k, _heads(self.v(x), self.num_heads)

    def attend_cached(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: AttentionMask | None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        pending: PendingWrite | None = None,
    ) -> Tensor:
        """Attend ``q`` to ``[valid cached K/V ; k, v]`` and (with ``pending``) write ``k, v`` to
        the cache.

        Returns the attention output ``[B, N, dim]`` before the output projection ``o``. The cache's
        host-side bookkeeping decides how many keys there are, so this part runs eagerly.
        """
        keys, values = k, v
        if kv_cache is not None:
            cached_k, cached_v = kv_cache.read(layer)
            if cached_k.shape[2]:
                keys = torch.cat([cached_k.to(k.dtype), k], dim=2)
                values = torch.cat([cached_v.to(v.dtype), v], dim=2)
        out = attend(q, keys, values, attn_mask)
        if kv_cache is not None and pending is not None:
            kv_cache.write(layer, k, v, pending)
        return out.transpose(1, 2).flatten(2)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: AttentionMask | None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        pending: PendingWrite | None = None,
    ) -> Tensor:
        """Attend the current tokens to ``[valid cached tokens ; current tokens]``.

        Args:
            x: ``[B, N, dim]`` current tokens (frame-major). rope: ``(cos, sin)`` tables of
            :func:`~mag.models.layers.rotation_tables` for the current tokens. attn_mask: mask over
            ``[N_cached + N]`` keys, or None (attend to everything). kv_cache: read (and, with
            ``pending``, written) at index ``layer``.
        Returns:
            ``[B, N, dim]``.
        """
        q, k, v = self.project(x, *rope)
        return self.o(self.attend_cached(q, k, v, attn_mask, kv_cache, layer, pending))


class CrossAttention(AttentionProjections):
    """Cross-attention from video tokens (queries) to text tokens (keys/values), RMS qk-norm."""

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, heads, L, head_dim]`` of embedded text ``context: [B, L, dim]``."""
        return _heads(self.norm_k(self.k(context)), self.num_heads), _heads(self.v(context),
                                                                            self.num_heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``x: [B, N, dim]`` attends to ``k, v: [B, heads, L, head_dim]``; returns ``[B, N,
        dim]``."""
        q = _heads(self.norm_q(self.q(x)), self.num_heads)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(out.transpose(1, 2).flatten(2))


__all__ = ["AttentionMask", "CrossAttention", "CrossAttentionCache", "SelfAttention", "attend",
           "block_causal_mask", "expand_frame_mask", "last_frame_memory_mask", "sink_window_mask"]
