"""Self-attention KV cache for block-causal streaming, and the policies that decide what it keeps.

Streaming protocol (Self-Forcing): a block of latent frames is denoised in K steps. During those
steps the model only READS the cache: each layer attends to the valid cached K/V plus the block's
own K/V. After the last step the clean block is run once more at t=0 with ``cache_write=True``;
that pass writes, layer by layer, the K/V of the frames the policy retains, and the cache commits
once at the end of the pass. Keys are stored after RoPE, so a cached frame keeps its absolute
temporal position whatever slot it lands in.

Storage is one pre-allocated tensor per K and V, ``[layers, B, heads, capacity_frames * tokens, head_dim]``
(the SDPA layout, so reading a contiguous run of slots is a view). Reads go in slot order, not time
order: once a ring wraps, its slots hold frames out of temporal order, which attention does not care about
(keys carry their RoPE positions, and attention is invariant to the order of the (key, value) pairs). Every
policy here fills slots from 0 and a full ring keeps all of them valid, so the valid slots are always a
prefix and every read is a view, never a gather. Which slots are valid and how
many frames have passed are plain Python ints/tuples: planning a write and choosing what to read
never touches the device, so the streaming loop has no host syncs.

Policy interface (:class:`CachePolicy`). A policy answers two questions for each finished block:
(a) which frames of the block are retained (``full`` / ``window``: all of them; ``downsample`` and
``mag``: only the last frame of the block, at its own RoPE position), and (b) which slot each
retained frame goes to, and therefore what is evicted (``window`` and the bounded variants re-use
slots as a ring, sinks are never overwritten). It also says how many slots a stream of a given
length needs. A policy is stateless: everything it needs (frames seen, frames retained,
capacity) is read from the cache.

:class:`MagPolicy` (the trained MAG memory model, :mod:`mag.memory`) needs nothing new in the plan:
it is :class:`DownsamplePolicy`'s (retain the last frame of each block, optional sinks, optional
ring of ``memory_slots``). The difference is *who* runs the write pass: the frozen memory model
(same architecture, its own weights, empty text) runs the clean block at t=0 with
``cache_write=True`` on the same ``KVCache`` the generator reads, so the retained frame's K/V
carry the whole block's information. A ``MagPolicy`` therefore only holds that writer
(:class:`mag.memory.MemoryWriter`) and says which cached frames the memory model may read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from mag.config import DiTConfig
from mag.errors import ConfigError, InputError

if TYPE_CHECKING:
    from mag.pipelines.streaming import CacheWriter

# K and V are both cached.
KV_TENSORS = 2


@dataclass(frozen=True)
class WritePlan:
    """Where the retained frames of one block go.

    Attributes:
        frames: indices (within the block) of the frames kept, increasing.
        slots: destination slot of each kept frame; a valid slot written again is evicted.
    """

    frames: tuple[int, ...]
    slots: tuple[int, ...]


class CachePolicy(Protocol):
    """What a KV-cache policy provides (see the module docstring)."""

    name: str

    def capacity_frames(self, horizon_frames: int, frames_per_block: int) -> int:
        """Slots needed to stream ``horizon_frames`` frames in blocks of ``frames_per_block``."""
        ...

    def plan(self, cache: KVCache, num_block_frames: int) -> WritePlan:
        """Which frames of the finished block to keep and in which slots (host ints only)."""
        ...


def _ring_slot(index: int, sink_frames: int, ring_frames: int | None) -> int:
    """Slot of the ``index``-th retained frame: sinks first, then a ring of ``ring_frames`` (None: none)."""
    if index < sink_frames or ring_frames is None:
        return index
    return sink_frames + (index - sink_frames) % ring_frames


class FullPolicy:
    """Keep every frame of every block: exact attention over the whole history (memory grows with N)."""

    name = "full"

    def capacity_frames(self, horizon_frames: int, frames_per_block: int) -> int:
        return horizon_frames

    def plan(self, cache: KVCache, num_block_frames: int) -> WritePlan:
        start = cache.frames_retained
        if start + num_block_frames > cache.capacity_frames:
            raise InputError(
                f"full KV cache holds {cache.capacity_frames} frames, {start} are used and the block adds"
                f" {num_block_frames}; allocate a larger capacity or use a window / downsample policy"
            )
        frames = tuple(range(num_block_frames))
        return WritePlan(frames=frames, slots=tuple(start + i for i in frames))


class WindowPolicy:
    """Keep ``sink_frames`` first frames forever plus the last ``window_frames`` frames (LongLive).

    The window part is a ring buffer: the oldest window frame is overwritten by the newest one.
    Attention of a block therefore sees the sinks, the ``window_frames`` frames before the block, and
    the block itself (:func:`mag.models.attention.sink_window_mask` is the equivalent full-sequence mask).
    """

    name = "window"

    def __init__(self, sink_frames: int, window_frames: int) -> None:
        if sink_frames < 0 or window_frames <= 0:
            raise ConfigError(
                f"WindowPolicy needs sink_frames >= 0 and window_frames > 0,"
                f" got {sink_frames}, {window_frames}"
            )
        self.sink_frames = sink_frames
        self.window_frames = window_frames

    def capacity_frames(self, horizon_frames: int, frames_per_block: int) -> int:
        return self.sink_frames + self.window_frames

    def plan(self, cache: KVCache, num_block_frames: int) -> WritePlan:
        if num_block_frames > self.window_frames:
            raise ConfigError(
                f"window policy keeps {self.window_frames} recent frames but a block has {num_block_frames};"
                " the window must hold at least one block"
            )
        start = cache.frames_retained
        frames = tuple(range(num_block_frames))
        slots = tuple(_ring_slot(start + i, self.sink_frames, self.window_frames) for i in frames)
        return WritePlan(frames=frames, slots=slots)


class DownsamplePolicy:
    """Keep only the last frame of each block, at its own RoPE position (the paper's "w/o stage 1").

    The first ``sink_frames`` frames of the stream are kept uncompressed. With ``memory_slots`` set,
    the compressed frames live in a ring of that many slots (the bounded variant: memory and
    per-frame cost stay flat for unbounded streams); ``None`` keeps every block's frame.
    """

    name = "downsample"

    def __init__(self, sink_frames: int = 0, memory_slots: int | None = None) -> None:
        if sink_frames < 0 or (memory_slots is not None and memory_slots <= 0):
            raise ConfigError(
                f"DownsamplePolicy needs sink_frames >= 0 and memory_slots > 0 or None,"
                f" got {sink_frames}, {memory_slots}"
            )
        self.sink_frames = sink_frames
        self.memory_slots = memory_slots

    def capacity_frames(self, horizon_frames: int, frames_per_block: int) -> int:
        if self.memory_slots is not None:
            return self.sink_frames + self.memory_slots
        return self.sink_frames + math.ceil(horizon_frames / frames_per_block)

    def plan(self, cache: KVCache, num_block_frames: int) -> WritePlan:
        seen = cache.frames_seen
        last = num_block_frames - 1
        frames = tuple(i for i in range(num_block_frames) if seen + i < self.sink_frames or i == last)
        start = cache.frames_retained
        slots = tuple(_ring_slot(start + j, self.sink_frames, self.memory_slots) for j in range(len(frames)))
        if max(slots) >= cache.capacity_frames:
            raise InputError(
                f"downsample KV cache holds {cache.capacity_frames} frames and is full; allocate"
                " capacity_frames(horizon) slots or set memory_slots for a bounded ring"
            )
        return WritePlan(frames=frames, slots=slots)


class MagPolicy(DownsamplePolicy):
    """MAG's compressed memory: :class:`DownsamplePolicy`'s plan, written by the memory model.

    The plan is unchanged (sinks in full, then each block's last frame at its own RoPE position; with
    ``memory_slots`` a ring of that many compressed frames whose oldest is evicted: the ``bounded``
    variant). What the policy adds:

    - ``writer``: the :class:`~mag.pipelines.streaming.CacheWriter` that runs the write pass
      (:class:`mag.memory.MemoryWriter`); a streaming generator uses it when given no writer, so a
      ``mag`` stream cannot silently fall back to the generator compressing its own blocks.
    - :meth:`memory_view`: the cached frames the memory model may read. Uncompressed sink frames exist
      for the generator; the memory model was trained to see only compressed frames (a block's last
      frame), so the others are hidden from its write pass.
    """

    def __init__(self, sink_frames: int = 0, memory_slots: int | None = None,
                 writer: CacheWriter | None = None) -> None:
        super().__init__(sink_frames, memory_slots)
        self.name = "mag" if memory_slots is None else "bounded"
        self.writer = writer

    def memory_view(self, cache: KVCache, frames_per_block: int) -> tuple[bool, ...] | None:
        """Per valid cached frame (read order): may the memory model attend to it? None: to all.

        Sinks occupy slots ``0..sink_frames-1`` and hold stream frames ``0..sink_frames-1`` (the first
        retained frames); a sink that is not a block's last frame is hidden. Every other slot holds a
        block's last frame.
        """
        hidden = {s for s in range(self.sink_frames) if s % frames_per_block != frames_per_block - 1}
        if hidden.isdisjoint(cache.valid_slots):
            return None
        return tuple(slot not in hidden for slot in cache.valid_slots)


@dataclass(frozen=True)
class PendingWrite:
    """A write pass in progress: the plan plus device index tensors for one ``index_copy_`` per layer."""

    plan: WritePlan
    num_block_frames: int
    source_tokens: Tensor  # [kept * tokens] token indices within the block
    dest_tokens: Tensor  # [kept * tokens] token indices within the cache
    kept_frames: Tensor  # [kept] plan.frames on the device
    dest_slots: Tensor  # [kept] plan.slots on the device


class KVCache:
    """Pre-allocated per-layer self-attention K/V for the frames a policy retains.

    Shapes: ``k``, ``v``: ``[layers, B, heads, capacity_frames * tokens_per_frame, head_dim]``;
    ``slot_positions``: ``[capacity_frames]`` long (RoPE temporal index of each slot, device side).
    Host side: ``valid_slots`` (tuple of slot ids in read order), ``frames_seen``, ``frames_retained``.
    K/V are stored detached: gradients never flow through the cache (as in Self-Forcing).
    """

    def __init__(
        self,
        policy: CachePolicy,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        capacity_frames: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity_frames <= 0 or tokens_per_frame <= 0 or batch_size <= 0:
            raise ConfigError(
                f"KVCache needs positive capacity_frames, tokens_per_frame and batch_size, got"
                f" {capacity_frames}, {tokens_per_frame}, {batch_size}"
            )
        self.policy = policy
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        self.batch_size = batch_size
        shape = (num_layers, batch_size, num_heads, capacity_frames * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_positions = torch.full((capacity_frames,), -1, dtype=torch.long, device=device)
        self.reset()

    @classmethod
    def for_model(
        cls,
        cfg: DiTConfig,
        policy: CachePolicy,
        *,
        tokens_per_frame: int,
        horizon_frames: int,
        frames_per_block: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """A cache sized by ``policy`` for a stream of ``horizon_frames`` latent frames."""
        return cls(
            policy,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            tokens_per_frame=tokens_per_frame,
            capacity_frames=policy.capacity_frames(horizon_frames, frames_per_block),
            batch_size=batch_size,
            dtype=dtype,
            device=device,
        )

    def reset(self) -> None:
        """Forget everything (new stream); the storage is kept and simply marked empty."""
        self._valid = [False] * self.capacity_frames
        self.valid_slots: tuple[int, ...] = ()
        self.frames_seen = 0
        self.frames_retained = 0
        self._read_index: Tensor | None = None
        self._hidden_prefix = 0

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def bytes_per_frame(self) -> int:
        """K and V bytes of one cached frame over all layers and the batch."""
        per_layer = self.batch_size * self.num_heads * self.tokens_per_frame * self.head_dim
        return KV_TENSORS * self.num_layers * per_layer * self.k.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by valid entries (what the policy actually keeps)."""
        return len(self.valid_slots) * self.bytes_per_frame

    @property
    def capacity_bytes(self) -> int:
        """Bytes allocated for all slots."""
        return self.capacity_frames * self.bytes_per_frame

    @property
    def num_valid_frames(self) -> int:
        """Cached frames a forward pass reads (all valid ones, minus a hidden prefix, see below)."""
        return len(self.valid_slots) - self._hidden_prefix

    @contextlib.contextmanager
    def hiding_prefix(self, frames: int) -> Iterator[KVCache]:
        """Within the block, reads skip the first ``frames`` cached frames (read order).

        Why: a frame mask that hides cached frames forces masked attention (no flash kernel on GPU, the
        grouped path on CPU). When the hidden frames are a prefix of the read order -- the uncompressed
        sinks that :meth:`MagPolicy.memory_view` hides from the memory model -- reading past them gives
        the same attention with no mask at all.
        """
        if not 0 <= frames <= len(self.valid_slots):
            raise InputError(f"cannot hide {frames} of {len(self.valid_slots)} cached frames")
        self._hidden_prefix = frames
        try:
            yield self
        finally:
            self._hidden_prefix = 0

    # -- read ----------------------------------------------------------------------------------

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """Valid cached K and V of ``layer``, each ``[B, heads, valid_frames * tokens, head_dim]``.

        Frames come in ``valid_slots`` (slot) order: a prefix of the slots is a view, other sets a gather;
        a frame mask over cached frames must use that order.
        """
        start = self._hidden_prefix * self.tokens_per_frame
        if self._read_index is None:
            end = len(self.valid_slots) * self.tokens_per_frame
            return self.k[layer, :, :, start:end], self.v[layer, :, :, start:end]
        index = self._read_index[start:]
        return self.k[layer].index_select(2, index), self.v[layer].index_select(2, index)

    def cached_positions(self) -> Tensor:
        """``[valid_frames]`` RoPE temporal index of each cached frame, in read order (device tensor)."""
        return self.slot_positions[list(self.valid_slots)[self._hidden_prefix:]]

    # -- write ---------------------------------------------------------------------------------

    def begin_write(self, num_block_frames: int) -> PendingWrite:
        """Ask the policy where the block's retained frames go; nothing changes until :meth:`commit`."""
        plan = self.policy.plan(self, num_block_frames)
        in_range = all(0 <= s < self.capacity_frames for s in plan.slots)
        if len(set(plan.slots)) != len(plan.slots) or not in_range:
            raise ConfigError(f"policy {self.policy.name!r} planned invalid slots {plan.slots}"
                              f" for a cache of {self.capacity_frames} frames")
        tokens = torch.arange(self.tokens_per_frame)
        source = torch.cat([f * self.tokens_per_frame + tokens for f in plan.frames])
        dest = torch.cat([s * self.tokens_per_frame + tokens for s in plan.slots])
        # Built on the host, copied without blocking: a blocking copy would make the host wait for the device.
        indices = (source, dest, torch.tensor(plan.frames), torch.tensor(plan.slots))
        device = self.k.device
        return PendingWrite(plan, num_block_frames, *(i.to(device, non_blocking=True) for i in indices))

    def write(self, layer: int, k: Tensor, v: Tensor, pending: PendingWrite) -> None:
        """Store the block's retained frames of post-RoPE ``k``, ``v``: ``[B, heads, F*tokens, head_dim]``."""
        for store, new in ((self.k, k), (self.v, v)):
            kept = new.detach().index_select(2, pending.source_tokens).to(store.dtype)
            store[layer].index_copy_(2, pending.dest_tokens, kept)

    def commit(self, pending: PendingWrite, frame_positions: Tensor) -> None:
        """Mark the written slots valid (evicting what they held) once every layer has been written.

        Args:
            frame_positions: ``[F]`` long, RoPE temporal index of each frame of the block.
        """
        plan = pending.plan
        self.slot_positions.index_copy_(0, pending.dest_slots, frame_positions.to(self.slot_positions.device)
                                        [pending.kept_frames])
        for slot in plan.slots:
            self._valid[slot] = True
        self.valid_slots = tuple(i for i, ok in enumerate(self._valid) if ok)
        self.frames_seen += pending.num_block_frames
        self.frames_retained += len(plan.frames)
        self._read_index = self._make_read_index()

    def _make_read_index(self) -> Tensor | None:
        """None when the valid slots are a prefix (read is a slice), else token indices to gather."""
        if self.valid_slots == tuple(range(len(self.valid_slots))):
            return None
        tokens = torch.arange(self.tokens_per_frame)
        index = torch.cat([s * self.tokens_per_frame + tokens for s in self.valid_slots])
        return index.to(self.k.device, non_blocking=True)

    def check_compatible(self, batch_size: int, tokens_per_frame: int, layers: int) -> None:
        """Raise InputError when a forward's geometry does not match the cache's."""
        expected = (self.batch_size, self.tokens_per_frame, self.num_layers)
        if (batch_size, tokens_per_frame, layers) != expected:
            raise InputError(
                f"KV cache was built for batch {self.batch_size}, {self.tokens_per_frame} tokens/frame,"
                f" {self.num_layers} layers; the forward has batch {batch_size}, {tokens_per_frame}"
                f" tokens/frame, {layers} layers"
            )


def valid_slot_positions(cache: KVCache) -> Sequence[int]:
    """Host-side helper for tests and reports: positions of the cached frames (syncs; not for hot loops)."""
    return cache.cached_positions().tolist()


__all__ = ["CachePolicy", "DownsamplePolicy", "FullPolicy", "KVCache", "MagPolicy", "PendingWrite",
           "WindowPolicy", "WritePlan", "valid_slot_positions"]
