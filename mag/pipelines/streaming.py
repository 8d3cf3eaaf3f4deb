"""Block-causal streaming generation over a KV cache (Self-Forcing protocol, docs/design.md §1).

One :class:`StreamingGenerator` owns one :class:`~mag.cache.KVCache` and the prompt's
cross-attention K/V. Every block of ``F`` latent frames is first *denoised* (sampler steps that only
read the cache), then *memorised* (one clean pass at ``t = 0`` by the stream's
:class:`~mag.pipelines.writers.CacheWriter`). ``feed`` memorises known clean frames;
``predict_block_teacher_forced`` memorises the true block after predicting it. Classifier-free
guidance runs the unconditional branch as a second stream with its own cache. The block loop keeps
everything on the device and never calls ``.item()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mag.cache import CachePolicy, KVCache, new_cache
from mag.config import Preset
from mag.errors import ConfigError, InputError
from mag.memory import MemoryWriter
from mag.models.attention import CrossAttentionCache
from mag.models.dit import WanDiT
from mag.pipelines.writers import CacheWriter, default_writer
from mag.schedulers import FlowMatchScheduler

__all__ = ["SAMPLERS", "SamplerConfig", "SamplerKind", "StreamingGenerator"]

SamplerKind = Literal["few_step", "euler"]
SAMPLERS: tuple[str, ...] = ("few_step", "euler")
# Guidance scale at which classifier-free guidance is off (the conditional prediction alone).
NO_GUIDANCE = 1.0


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SamplerConfig:
    """How a block is denoised.

    Attributes:
        kind: ``few_step`` (Self-Forcing: the preset's shifted few-step list, x0 + re-noise) or
            ``euler`` (probability-flow ODE with ``steps`` Euler steps).
        steps: number of Euler steps (``euler`` only; ``few_step`` takes its count from the preset).
        guidance_scale: classifier-free guidance; ``1.0`` = off (one conditional pass per step).
    """

    kind: SamplerKind = "few_step"
    steps: int = 0
    guidance_scale: float = NO_GUIDANCE

    def validate(self) -> SamplerConfig:
        if self.kind not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.kind!r}; valid samplers: "
                              f"{', '.join(SAMPLERS)}")
        if self.kind == "euler" and self.steps < 1:
            raise ConfigError(f"the euler sampler needs steps >= 1, got {self.steps}")
        if self.guidance_scale <= 0:
            raise ConfigError(f"guidance_scale must be > 0 (1 = off), got {self.guidance_scale}")
        return self

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != NO_GUIDANCE


# ---------------------------------------------------------------------------------------------
# The generator


class StreamingGenerator:
    """Block-by-block generation with one KV cache under ``policy`` (see the module docstring).

    Usage::

        gen = StreamingGenerator(model, scheduler, preset, policy)
        gen.reset(batch_size=B, horizon_frames=N)
        gen.set_prompt(context)              # [B, L, text_dim] text-encoder output
        gen.feed(history)                    # optional: [B, n*F, C, H, W] clean frames
        block = gen.generate_block(generator)  # [B, F, C, H, W]
    """

    @classmethod
    def for_preset(cls, model: WanDiT, preset: Preset, policy: CachePolicy, *,
                   sampler: SamplerConfig | None = None,
                   writer: CacheWriter | None = None) -> StreamingGenerator:
        """A stream with the preset's scheduler and the model's prediction target (x0 or
        velocity)."""
        return cls(model, FlowMatchScheduler(preset.scheduler, preset.dit.prediction), preset,
                   policy, sampler=sampler, writer=writer)

    def __init__(self, model: WanDiT, scheduler: FlowMatchScheduler, preset: Preset,
                 policy: CachePolicy,
                 *, sampler: SamplerConfig | None = None,
                 writer: CacheWriter | None = None) -> None:
        self.model = model
        self.scheduler = scheduler
        self.preset = preset
        self.policy = policy
        self.sampler = (sampler or SamplerConfig()).validate()
        self.writer: CacheWriter = writer or default_writer(policy, model)
        self.frames_per_block = preset.cache.frames_per_block
        self.cache: KVCache | None = None
        self.uncond_cache: KVCache | None = None
        self.context: CrossAttentionCache | None = None
        self.uncond_context: CrossAttentionCache | None = None
        self.position = 0
        self.horizon_frames = 0
        self._steps: list[tuple[Tensor, Tensor | None]] = []
        # Clean blocks whose frames the cache still holds (generator-written caches only), for
        # recache.
        self._live_blocks: list[_WrittenBlock] = []

    # -- geometry ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.patch_embedding.weight.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent frame at the preset's resolution."""
        video = self.preset.video
        return video.latent_channels, video.latent_height, video.latent_width

    @property
    def batch_size(self) -> int:
        return self._require_cache().batch_size

    @property
    def forwards_per_block(self) -> int:
        """Network forwards a generated block costs: one per sampler step (two under guidance) and
        one write pass per cache (the memory model's under ``mag`` / ``bounded``). Valid after
        :meth:`reset`."""
        passes = 2 if self.uncond_cache is not None else 1
        return passes * (len(self._steps) + 1)

    def _require_cache(self) -> KVCache:
        if self.cache is None:
            raise InputError("the stream is not started; call reset(batch_size, horizon_frames) "
                             "first")
        return self.cache

    def _require_context(self) -> CrossAttentionCache:
        if self.context is None:
            raise InputError("no prompt set; call set_prompt(context) after reset()")
        return self.context

    # -- stream control ------------------------------------------------------------------------

    def reset(self, batch_size: int, horizon_frames: int) -> None:
        """Start a new stream of up to ``horizon_frames`` latent frames for ``batch_size``
        samples."""
        if batch_size <= 0 or horizon_frames <= 0:
            raise InputError(f"reset needs batch_size > 0 and horizon_frames > 0, got {batch_size},"
                             f" {horizon_frames}")
        _, ph, pw = self.model.cfg.patch_size
        _, height, width = self.latent_shape
        param = self.model.patch_embedding.weight

        def stream_cache() -> KVCache:
            return new_cache(self.model.cfg, self.policy,
                             tokens_per_frame=(height // ph) * (width // pw),
                             view_width=width // pw, horizon_frames=horizon_frames,
                             frames_per_block=self.frames_per_block, batch_size=batch_size,
                             dtype=param.dtype, device=param.device)

        cache = stream_cache()
        last = cache.rope_position(horizon_frames - self.frames_per_block) + self.frames_per_block
        if last > self.model.cfg.rope_max_positions:
            raise InputError(f"horizon of {horizon_frames} frames exceeds dit.rope_max_positions="
                             f"{self.model.cfg.rope_max_positions}")
        self.cache = cache
        self.uncond_cache = stream_cache() if self.sampler.uses_guidance else None
        self.context = None
        self.uncond_context = None
        self.position = 0
        self.horizon_frames = horizon_frames
        self._steps = self._timestep_pairs(batch_size)
        self._live_blocks = []

    def set_prompt(self, context: Tensor | CrossAttentionCache,
                   uncond_context: Tensor | CrossAttentionCache | None = None) -> None:
        """Encode the prompt's cross-attention K/V once for the whole stream.

        Args:
            context: ``[B, L, text_dim]`` text embeddings (or an already encoded cache).
            uncond_context: the empty prompt's embeddings, needed only when guidance is on.
        """
        cache = self._require_cache()
        with torch.no_grad():
            self.context = self._encode(context, cache.batch_size, "context")
            self.uncond_context = None
            if self.sampler.uses_guidance:
                if uncond_context is None:
                    raise InputError(f"guidance_scale={self.sampler.guidance_scale} needs "
                                     "uncond_context (the empty prompt's embeddings)")
                self.uncond_context = self._encode(uncond_context, cache.batch_size,
                                                   "uncond_context")

    def _encode(self, context: Tensor | CrossAttentionCache, batch: int,
                name: str) -> CrossAttentionCache:
        encoded = context if isinstance(context,
                                        CrossAttentionCache) else self.model.encode_context(
            context.to(self.device))
        if encoded.batch_size != batch:
            raise InputError(f"{name} has batch {encoded.batch_size}, the stream was reset for "
                             f"{batch}")
        return encoded

    # -- the three block operations ------------------------------------------------------------

    @torch.no_grad()
    def feed(self, latents: Tensor, width_offsets: Tensor | None = None) -> None:
        """Teacher-force clean frames into the cache block by block (write pass at t=0 only).

        Args:
            latents: ``[B, n*F, C, H, W]`` clean latents continuing the stream at :attr:`position`.
            width_offsets: ``[B, n*F]`` camera positions in patches (camera-anchored models only).
        """
        self._check_frames(latents, "latents", whole_blocks=True)
        latents = latents.to(self.device)
        for start in range(0, latents.shape[1], self.frames_per_block):
            frames = slice(start, start + self.frames_per_block)
            self._memorise(latents[:, frames],
                           None if width_offsets is None else width_offsets[:, frames])

    @torch.no_grad()
    def generate_block(self, generator: torch.Generator | None = None,
                       width_offsets: Tensor | None = None, *, noise: Tensor | None = None,
                       renoise: Sequence[Tensor] | None = None) -> Tensor:
        """Denoise the next block from noise, memorise it, and return it: ``[B, F, C, H, W]``.

        ``width_offsets: [B, F]``: where the camera looks in this block (camera-anchored models
        only). ``noise`` (the block's starting noise) and ``renoise`` (the fresh noise of each
        few-step re-noising, in order) replace the draws from ``generator``, to replay another
        implementation's run exactly.
        """
        block = self._denoise(generator, width_offsets, noise=noise, renoise=renoise)
        self._memorise(block, width_offsets)
        return block

    @torch.no_grad()
    def predict_block_teacher_forced(self, true_block: Tensor,
                                     generator: torch.Generator | None = None,
                                     width_offsets: Tensor | None = None) -> Tensor:
        """Denoise the next block like :meth:`generate_block`, then memorise ``true_block`` instead.

        Args:
            true_block: ``[B, F, C, H, W]`` the real clean latents of this block.
            width_offsets: ``[B, F]`` camera positions in patches (camera-anchored models only).
        Returns:
            ``[B, F, C, H, W]`` the prediction made from the true past.
        """
        self._check_frames(true_block, "true_block", whole_blocks=True)
        if true_block.shape[1] != self.frames_per_block:
            raise InputError(f"true_block must hold one block of {self.frames_per_block} frames, "
                             f"got {true_block.shape[1]}")
        prediction = self._denoise(generator, width_offsets)
        self._memorise(true_block.to(self.device), width_offsets)
        return prediction

    # -- prompt switch (LongLive's KV re-cache) ----------------------------------------------------

    @torch.no_grad()
    def recache(self, context: Tensor | CrossAttentionCache,
                uncond_context: Tensor | CrossAttentionCache | None = None) -> None:
        """Switch the prompt mid-stream and rewrite the cached K/V of the retained frames under it.

        A cached frame's K/V depend on the prompt it was written with (cross-attention feeds every
        layer after the first), so after :meth:`set_prompt` alone the next blocks would read history
        that still "says" the old prompt. LongLive's KV re-cache re-runs the write pass of the
        retained recent frames at t=0 with the new prompt. Here: the cache is emptied and every
        block that still has a frame in it (the sinks and the window for ``window``; every block for
        ``full`` / ``downsample``) is written again, oldest first, at its own positions and into its
        own slots, each block attending to the re-written blocks before it. Frames the cache had
        already evicted are not seen again, so when nothing was evicted the cache equals that of a
        stream that had the new prompt from the start.

        Under ``mag`` / ``bounded`` the memory model writes the cache with the empty prompt, so the
        cache does not depend on the prompt and only the prompt itself changes.

        Args:
            context: ``[B, L, text_dim]`` the new prompt's embeddings (or an encoded cache).
            uncond_context: the empty prompt's embeddings when guidance is on.
        """
        self.set_prompt(context, uncond_context)
        if not self._writes_with_prompt:
            return
        for cache, prompt in ((self.cache, self.context), (self.uncond_cache, self.uncond_context)):
            if cache is None or prompt is None:
                continue
            seen, retained = cache.frames_seen, cache.frames_retained
            cache.reset()
            for block in self._live_blocks:
                # The counters the policy planned this block's slots from: the same slots again.
                cache.frames_seen, cache.frames_retained = block.position, block.frames_retained
                positions = torch.arange(block.position, block.position + self.frames_per_block,
                                         device=self.device)
                self.writer.write(cache, block.latents, positions, prompt,
                                  width_offsets=block.width_offsets)
            cache.frames_seen, cache.frames_retained = seen, retained

    @property
    def _writes_with_prompt(self) -> bool:
        """Whether cached K/V depend on the prompt (not when the memory model writes them)."""
        return not isinstance(self.writer, MemoryWriter)

    def _record_block(self, cache: KVCache, clean_block: Tensor, offsets: Tensor | None) -> None:
        """Keep ``clean_block`` for :meth:`recache`; forget blocks whose slots the write will
        reuse."""
        # pure: what begin_write will plan
        slots = self.policy.plan(cache, self.frames_per_block).slots
        taken = set(slots)
        live = []
        for block in self._live_blocks:
            block.slots = tuple(s for s in block.slots if s not in taken)
            if block.slots:
                live.append(block)
        kept = clean_block.detach().clone()
        live.append(_WrittenBlock(self.position, cache.frames_retained, kept, offsets, slots))
        self._live_blocks = live

    # -- internals -----------------------------------------------------------------------------

    def _positions(self) -> Tensor:
        start = self._require_cache().rope_position(self.position)
        return torch.arange(start, start + self.frames_per_block, device=self.device)

    def _prepare(self, width_offsets: Tensor | None) -> None:
        """Let the caches prepare the next block (the archive retrieves for its camera)."""
        for cache in filter(None, (self.cache, self.uncond_cache)):
            cache.prepare_block(self.position, width_offsets)

    def _check_frames(self, latents: Tensor, name: str, whole_blocks: bool) -> None:
        cache = self._require_cache()
        expected = (cache.batch_size, *self.latent_shape)
        found = (latents.shape[0],
                 *latents.shape[2:]) if latents.ndim == 5 else tuple(latents.shape)
        if latents.ndim != 5 or found != expected:
            raise InputError(f"{name} must be [{expected[0]}, n*{self.frames_per_block}, "
                             f"{expected[1]}, {expected[2]}, {expected[3]}], got "
                             f"{list(latents.shape)}")
        if whole_blocks and (latents.shape[1] == 0 or latents.shape[1] % self.frames_per_block):
            raise InputError(f"{name} must hold whole blocks of {self.frames_per_block} frames, "
                             f"got {latents.shape[1]}")
        if self.position + latents.shape[1] > self.horizon_frames:
            raise InputError(f"the stream was reset for {self.horizon_frames} frames; "
                             f"{self.position} are done and {latents.shape[1]} more do not fit")

    def _memorise(self, clean_block: Tensor, width_offsets: Tensor | None) -> None:
        """Phase 2: the writer runs the clean block at t=0 into the cache; the stream advances."""
        self._prepare(width_offsets)
        cache, positions = self._require_cache(), self._positions()
        offsets = self._offsets(width_offsets)
        if self._writes_with_prompt:
            self._record_block(cache, clean_block, offsets)
        self.writer.write(cache, clean_block, positions, self._require_context(),
                          width_offsets=offsets)
        if self.uncond_cache is not None and self.uncond_context is not None:
            self.writer.write(self.uncond_cache, clean_block, positions, self.uncond_context,
                              width_offsets=offsets)
        self.position += self.frames_per_block

    def _timestep_pairs(self, batch: int) -> list[tuple[Tensor, Tensor | None]]:
        """``(t, t_next)`` per sampler step as ``[B]`` device tensors; ``t_next`` None on the last
        step."""
        if self.sampler.kind == "few_step":
            levels = self.scheduler.few_step_timesteps()
        else:
            levels = torch.cat([self.scheduler.sampling_timesteps(self.sampler.steps),
                                torch.zeros(1)])
        levels = levels.to(self.device)
        per_sample = [level.expand(batch).contiguous() for level in levels]
        if self.sampler.kind == "few_step":
            return [(t, per_sample[i + 1] if i + 1 < len(per_sample) else None)
                    for i, t in enumerate(per_sample)]
        return list(zip(per_sample[:-1], per_sample[1:], strict=True))

    def _offsets(self, width_offsets: Tensor | None) -> Tensor | None:
        return None if width_offsets is None else width_offsets.to(self.device)

    def _predict(self, x: Tensor, t: Tensor, positions: Tensor, offsets: Tensor | None) -> Tensor:
        """Raw network output for the noisy block, with classifier-free guidance when enabled."""
        cache = self._require_cache()
        out = self.model(x, t, self._require_context(), frame_positions=positions, kv_cache=cache,
                         width_offsets=offsets)
        if self.uncond_context is not None:
            uncond = self.model(x, t, self.uncond_context, frame_positions=positions,
                                kv_cache=self.uncond_cache, width_offsets=offsets)
            out = uncond + self.sampler.guidance_scale * (out - uncond)
        return out

    def _denoise(self, generator: torch.Generator | None, width_offsets: Tensor | None, *,
                 noise: Tensor | None = None, renoise: Sequence[Tensor] | None = None) -> Tensor:
        """Phase 1: sample one block from noise, reading the cache; ``[B, F, C, H, W]``."""
        cache = self._require_cache()
        if self.position + self.frames_per_block > self.horizon_frames:
            raise InputError(f"the stream was reset for {self.horizon_frames} frames and is full")
        shape = (cache.batch_size, self.frames_per_block, *self.latent_shape)
        dtype = self.model.patch_embedding.weight.dtype
        if noise is not None and tuple(noise.shape) != shape:
            raise InputError(f"noise must be {list(shape)}, got {list(noise.shape)}")
        if renoise is not None and len(renoise) != len(self._steps) - 1:
            raise InputError(f"renoise needs {len(self._steps) - 1} tensors (one per re-noising), "
                             f"got {len(renoise)}")
        x = (torch.randn(shape, generator=generator, device=self.device,
                         dtype=dtype) if noise is None
             else noise.to(device=self.device, dtype=dtype))
        self._prepare(width_offsets)
        positions, offsets = self._positions(), self._offsets(width_offsets)
        for i, (t, t_next) in enumerate(self._steps):
            out = self._predict(x, t, positions, offsets)
            if self.sampler.kind == "few_step":
                x0 = self.scheduler.to_x0(out, x, t)
                if t_next is None:
                    x = x0
                elif renoise is None:
                    x = self.scheduler.renoise(x0, t_next, generator)
                else:
                    x = self.scheduler.add_noise(x0, renoise[i].to(device=x0.device,
                                                                   dtype=x0.dtype), t_next)
            else:
                x = self.scheduler.step_euler(self.scheduler.to_velocity(out, x, t), x, t, t_next)
        return x


@dataclass
class _WrittenBlock:
    """A memorised block that still has frames in the cache: what :meth:`StreamingGenerator.recache`
    needs to write it again.

    Attributes:
        position: RoPE position of its first frame (= ``cache.frames_seen`` before its write).
        frames_retained: ``cache.frames_retained`` before its write (the policy plans slots from
        it). latents: ``[B, F, C, H, W]`` its clean latents. width_offsets: ``[B, F]`` camera
        positions (patches) or None. slots: cache slots that still hold its frames.
    """

    position: int
    frames_retained: int
    latents: Tensor
    width_offsets: Tensor | None
    slots: tuple[int, ...]
