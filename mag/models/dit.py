"""The Wan2.1 diffusion transformer, block-causal and KV-cached, with per-frame timesteps.

    latent [B, F, C, H, W] --Conv3d patchify--> tokens [B, F*T, dim]        (T = H/ph * W/pw)
    timestep [B, F] --sinusoid--> time_embedding (+ action_embedding) = e   [B, F, dim]
                    --time_projection--> e0                                  [B, F, 6, dim]
    text [B, L, text_dim] --text_embedding--> per-layer cross K/V            (encode_context)
    N x block:  x += gate1 * self_attn(mod(norm1(x)))        (RMS qk-norm, 3D RoPE, KV cache)
                x += cross_attn(norm3(x), text)               (affine LayerNorm, RMS qk-norm)
                x += gate2 * ffn(mod(norm2(x)))               (Linear -> GELU(tanh) -> Linear)
    head: Linear(mod(norm(x)))  --unpatchify--> [B, F, C_out, H, W]

Parameter names are Wan2.1's; per-frame modulation and the float32 parts: docs/design.md, "The DiT".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mag.cache import KVCache, PendingWrite
from mag.config import DiTConfig
from mag.errors import ConfigError, InputError
from mag.models.attention import AttentionMask, CrossAttention, CrossAttentionCache, SelfAttention
from mag.models.layers import (
    Float32Sequential,
    FP32LayerNorm,
    RMSNorm,
    RotaryEmbedding3D,
    gated_residual,
    init_linear_xavier,
    linear_float32,
    modulate,
    rotation_tables,
    sinusoidal_embedding,
)

# Wan's init: embeddings of text and time draw weights from N(0, 0.02^2).
EMBEDDING_INIT_STD = 0.02
# Modulation tables (6 per block, 2 in the head): shift/scale/gate for self-attention and FFN.
BLOCK_MODULATIONS = 6
HEAD_MODULATIONS = 2

MaskExecution = Literal["auto", "dense", "grouped"]


class WanBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention to text, modulated FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm
                      else nn.Identity())
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, BLOCK_MODULATIONS, dim))

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: AttentionMask | None,
        cross_kv: tuple[Tensor, Tensor],
        kv_cache: KVCache | None,
        layer: int,
        pending: PendingWrite | None,
    ) -> Tensor:
        """``x: [B, F*T, dim]``, ``e0: [B, F, 6, dim]`` float32 projected time embedding.

        Split at the cache: :meth:`before_cache` and :meth:`after_cache` have fixed shapes per block
        (the regions ``--compile`` compiles); the cached attention between them stays eager.
        """
        q, k, v = self.before_cache(x, e0, *rope)
        attended = self.self_attn.attend_cached(q, k, v, attn_mask, kv_cache, layer, pending)
        return self.after_cache(x, attended, e0, *cross_kv)

    def _modulations(self, e0: Tensor) -> tuple[Tensor, ...]:
        """shift1, scale1, gate1, shift2, scale2, gate2, each ``[B, F, 1, dim]`` float32."""
        return (self.modulation + e0.float()).unsqueeze(3).unbind(2)

    def before_cache(self, x: Tensor, e0: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor,
                                                                                     Tensor]:
        """Modulated ``norm1`` and the self-attention's post-RoPE ``q, k, v``."""
        shift1, scale1 = self._modulations(e0)[:2]
        h = modulate(self.norm1(x).unflatten(1, (e0.shape[1], -1)), shift1, scale1).flatten(1,
                                                                                            2).type_as(x)
        return self.self_attn.project(h, cos, sin)

    def after_cache(self, x: Tensor, attended: Tensor, e0: Tensor, cross_k: Tensor,
                    cross_v: Tensor) -> Tensor:
        """Output projection and gated residual of self-attention, cross-attention, modulated
        FFN."""
        frames = e0.shape[1]
        _, _, gate1, shift2, scale2, gate2 = self._modulations(e0)

        def per_frame(t: Tensor) -> Tensor:
            return t.unflatten(1, (frames, -1))

        y = self.self_attn.o(attended)
        x = gated_residual(per_frame(x), per_frame(y), gate1).flatten(1, 2).type_as(x)

        x = x + self.cross_attn(self.norm3(x), cross_k, cross_v)

        h = modulate(per_frame(self.norm2(x)), shift2, scale2).flatten(1, 2).type_as(x)
        y = self.ffn(h)
        return gated_residual(per_frame(x), per_frame(y), gate2).flatten(1, 2).type_as(x)


class Head(nn.Module):
    """Output head: 2-way modulation (shift, scale) of a LayerNorm, then a Linear to patch
    values."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, HEAD_MODULATIONS, cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """``x: [B, F*T, dim]``, ``e: [B, F, dim]`` time embedding -> ``[B, F*T, C_out * patch
        volume]``."""
        shift, scale = (self.modulation + e.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        h = modulate(self.norm(x).unflatten(1, (e.shape[1], -1)), shift, scale).flatten(1, 2)
        return linear_float32(self.head, h)  # float32 output, as Wan's head


class WanDiT(nn.Module):
    """Wan2.1 DiT with frame-level masks, a self-attention KV cache and optional camera actions.

    Build on the meta device, move with ``to_empty``, then call :meth:`init_weights` (torchtitan
    style); building on a real device initialises at once.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.patch_size[0] != 1:
            raise ConfigError(
                "dit.patch_size[0] must be 1 (one token frame per latent frame, needed for "
                "frame-level"
                f" causality and per-frame timesteps), got {cfg.patch_size}"
            )
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim),
                                            nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = Float32Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(),
                                                nn.Linear(dim, dim))
        self.time_projection = Float32Sequential(nn.SiLU(), nn.Linear(dim, BLOCK_MODULATIONS * dim))
        # No bias: ``actions=None`` is then exactly the zero action.
        self.action_embedding = nn.Linear(cfg.action_dim, dim,
                                          bias=False) if cfg.action_dim > 0 else None
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RotaryEmbedding3D(cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)
        # How frame masks run (mag.models.attention): "auto" = grouped on CPU, dense fused SDPA
        # elsewhere.
        self.mask_execution: MaskExecution = "auto"
        if self.patch_embedding.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's initialisation; the output head and the action embedding start at zero."""
        init_linear_xavier(self)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=EMBEDDING_INIT_STD)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=self.cfg.dim ** -0.5)
        nn.init.normal_(self.head.modulation, std=self.cfg.dim ** -0.5)
        nn.init.zeros_(self.head.head.weight)
        if self.action_embedding is not None:
            nn.init.zeros_(self.action_embedding.weight)
        self.rope.reset_parameters()

    def grouped_attention(self, device: torch.device) -> bool:
        """Whether frame masks run block-sparse by query groups (else one dense masked SDPA)."""
        if self.mask_execution == "auto":
            return device.type == "cpu"
        return self.mask_execution == "grouped"

    def encode_context(self, context: Tensor) -> CrossAttentionCache:
        """Embed text once and project every layer's cross-attention K/V (reuse for all blocks and
        steps).

        Args:
            context: ``[B, L, text_dim]`` text-encoder output (Wan pads it with zeros to 512
            tokens).
        """
        if context.ndim != 3 or context.shape[-1] != self.cfg.text_dim:
            raise InputError(f"context must be [B, L, {self.cfg.text_dim}], got "
                             f"{tuple(context.shape)}")
        embedded = self.text_embedding(context.to(self.patch_embedding.weight.dtype))
        projected = [block.cross_attn.project_context(embedded) for block in self.blocks]
        keys, values = zip(*projected, strict=True)
        return CrossAttentionCache(torch.stack(keys), torch.stack(values))

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor | CrossAttentionCache,
        *,
        frame_positions: Tensor | Sequence[int] | None = None,
        frame_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_write: bool = False,
        actions: Tensor | None = None,
        width_offsets: Tensor | None = None,
    ) -> Tensor:
        """Denoise (or, with ``cache_write``, memorise) a run of latent frames.

        Args:
            x: ``[B, F, C_in, H, W]`` latents. timestep: ``[B]`` or ``[B, F]`` (one per latent
            frame), in [0, 1000]. context: ``[B, L, text_dim]`` text embeddings or a
            :class:`CrossAttentionCache`. frame_positions: ``[F]`` long RoPE temporal index per
            frame; default ``arange(F)``. frame_mask: ``[F, F_cached + F]`` bool over ``[cached
            frames (read order) ; current frames]``,
                True = may attend; None = attend to everything (bidirectional).
            kv_cache: read in every layer; written when ``cache_write`` (then committed once).
            cache_write: store the policy's retained frames of this pass (the clean pass at t=0).
            actions: ``[B, F, action_dim]`` camera actions; None = zero action. width_offsets: ``[B,
            F]`` horizontal camera position of each frame in patches; required
                when ``cfg.camera_rope`` (camera-anchored RoPE), refused otherwise.
        Returns:
            ``[B, F, C_out, H, W]`` raw network output.
        """
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise InputError(f"x must be [B, F, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        batch, frames, _, height, width = x.shape
        _, ph, pw = cfg.patch_size
        if height % ph or width % pw:
            raise InputError(f"latent size {height}x{width} is not divisible by the patch size "
                             f"{(ph, pw)}")
        grid_h, grid_w = height // ph, width // pw
        tokens_per_frame = grid_h * grid_w

        positions = self._frame_positions(frame_positions, frames, x.device)
        timestep = self._per_frame_timestep(timestep, batch, frames).to(x.device)
        cross = context if isinstance(context,
                                      CrossAttentionCache) else self.encode_context(context)
        if cross.batch_size != batch:
            raise InputError(f"context batch {cross.batch_size} does not match x batch {batch}")

        # Time (and action) embedding per frame, then the 6-way block modulation.
        param_dtype = self.patch_embedding.weight.dtype
        e = self.time_embedding(sinusoidal_embedding(timestep, cfg.freq_dim))  # float32, as in Wan
        e = e + self._action_embedding(actions, batch, frames, param_dtype)
        e0 = self.time_projection(e).unflatten(-1, (BLOCK_MODULATIONS, cfg.dim))

        # Contiguous: every layer gets the same strides, so a compiled block region has one graph,
        # not two.
        patches = self.patch_embedding(x.transpose(1, 2).to(param_dtype))
        tokens = patches.flatten(2).transpose(1, 2).contiguous()
        offsets = self._width_offsets(width_offsets, batch, frames, x.device)
        # once for all layers
        rope = rotation_tables(*self.rope(positions, grid_h, grid_w, offsets))

        cached_frames = 0
        if kv_cache is not None:
            kv_cache.check_compatible(batch, tokens_per_frame, cfg.num_layers)
            cached_frames = kv_cache.num_valid_frames
        elif cache_write:
            raise InputError("cache_write=True needs a kv_cache")
        attn_mask = None
        if frame_mask is not None:
            expected = (frames, cached_frames + frames)
            if tuple(frame_mask.shape) != expected or frame_mask.dtype != torch.bool:
                raise InputError(f"frame_mask must be bool {list(expected)} (current x [cached ; "
                                 "current]"
                                 " frames),"
                                 f" got {frame_mask.dtype} {list(frame_mask.shape)}")
            attn_mask = AttentionMask.from_frame_mask(frame_mask, tokens_per_frame, x.device,
                                                      grouped=self.grouped_attention(x.device))

        pending = kv_cache.begin_write(frames) if cache_write and kv_cache is not None else None
        for layer, block in enumerate(self.blocks):
            cross_kv = (cross.k[layer], cross.v[layer])
            tokens = block(tokens, e0, rope, attn_mask, cross_kv, kv_cache, layer, pending)
        if pending is not None:
            kv_cache.commit(pending, positions)

        out = self.head(tokens, e)
        return self._unpatchify(out, frames, grid_h, grid_w)

    # -- input helpers -------------------------------------------------------------------------

    def _frame_positions(self, frame_positions: Tensor | Sequence[int] | None, frames: int,
                         device: torch.device) -> Tensor:
        if frame_positions is None:
            return torch.arange(frames, device=device)
        if not isinstance(frame_positions, Tensor):
            values = list(frame_positions)
            if values and not 0 <= min(values) <= max(values) < self.cfg.rope_max_positions:
                raise InputError(f"frame positions must lie in [0, {self.cfg.rope_max_positions}),"
                                 f" got {min(values)}..{max(values)}; raise dit.rope_max_positions")
            frame_positions = torch.tensor(values, dtype=torch.long)
        if frame_positions.shape != (frames,):
            raise InputError(f"frame_positions must be [{frames}], got "
                             f"{list(frame_positions.shape)}")
        return frame_positions.to(device=device, dtype=torch.long)

    def _width_offsets(self, width_offsets: Tensor | None, batch: int, frames: int,
                       device: torch.device) -> Tensor | None:
        if not self.cfg.camera_rope:
            if width_offsets is not None:
                raise InputError("width_offsets given but the model has dit.camera_rope=False")
            return None
        if width_offsets is None or tuple(width_offsets.shape) != (batch, frames):
            found = None if width_offsets is None else list(width_offsets.shape)
            raise InputError(f"a camera-anchored model (dit.camera_rope) needs width_offsets"
                             f" [{batch}, {frames}] (camera position per frame, in patches), got "
                             f"{found}")
        return width_offsets.to(device)

    @staticmethod
    def _per_frame_timestep(timestep: Tensor, batch: int, frames: int) -> Tensor:
        if timestep.shape == (batch,):
            return timestep[:, None].expand(batch, frames)
        if timestep.shape == (batch, frames):
            return timestep
        raise InputError(f"timestep must be [{batch}] or [{batch}, {frames}], got "
                         f"{list(timestep.shape)}")

    def _action_embedding(self, actions: Tensor | None, batch: int, frames: int,
                          dtype: torch.dtype) -> Tensor | int:
        if self.action_embedding is None:
            if actions is not None:
                raise InputError("actions given but the model has dit.action_dim=0 (no action "
                                 "conditioning)")
            return 0
        if actions is None:
            return 0
        expected = (batch, frames, self.cfg.action_dim)
        if tuple(actions.shape) != expected:
            raise InputError(f"actions must be {list(expected)}, got {list(actions.shape)}")
        return self.action_embedding(actions.to(dtype))

    def _unpatchify(self, out: Tensor, frames: int, grid_h: int, grid_w: int) -> Tensor:
        """``[B, F*h*w, ph*pw*C]`` (patch-major, channel-minor as in Wan) -> ``[B, F, C, h*ph,
        w*pw]``."""
        _, ph, pw = self.cfg.patch_size
        c = self.cfg.out_channels
        out = out.view(out.shape[0], frames, grid_h, grid_w, ph, pw, c)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(out.shape[0], frames, c, grid_h * ph,
                                                        grid_w * pw)


def count_parameters(model: nn.Module) -> int:
    """Exact parameter count (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["Head", "WanBlock", "WanDiT", "count_parameters"]
