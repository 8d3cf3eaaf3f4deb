"""KV-cache policies: which frames of a finished block are kept, and in which slots.

A policy is stateless: it reads the counters of a :class:`CacheState` (a
:class:`~mag.cache.kv.KVCache` or a host-only replay) and returns a :class:`WritePlan` of host ints,
so planning never touches the device. Every policy fills slots from 0 and a full ring keeps all of
them valid: the valid slots are always a prefix of the storage. ``full`` / ``window`` keep every
frame; ``downsample`` / ``mag`` keep the last frame of each block (plus uncompressed sinks),
optionally in a ring of ``memory_slots``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from mag.errors import ConfigError, InputError


class CacheState(Protocol):
    """The host-side counters a policy plans from (a KV cache's, or a replay's)."""

    capacity_frames: int
    frames_seen: int
    frames_retained: int
    valid_slots: tuple[int, ...]


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

    def plan(self, cache: CacheState, num_block_frames: int) -> WritePlan:
        """Which frames of the finished block to keep and in which slots (host ints only)."""
        ...


def _ring_slot(index: int, sink_frames: int, ring_frames: int | None) -> int:
    """Slot of the ``index``-th retained frame: sinks first, then a ring of ``ring_frames`` (None:
    none)."""
    if index < sink_frames or ring_frames is None:
        return index
    return sink_frames + (index - sink_frames) % ring_frames


class FullPolicy:
    """Keep every frame of every block: exact attention over the whole history (memory grows with
    N)."""

    name = "full"

    def capacity_frames(self, horizon_frames: int, frames_per_block: int) -> int:
        return horizon_frames

    def plan(self, cache: CacheState, num_block_frames: int) -> WritePlan:
        start = cache.frames_retained
        if start + num_block_frames > cache.capacity_frames:
            raise InputError(
                f"full KV cache holds {cache.capacity_frames} frames, {start} are used and the "
                "block adds"
                f" {num_block_frames}; allocate a larger capacity or use a window / downsample "
                "policy"
            )
        frames = tuple(range(num_block_frames))
        return WritePlan(frames=frames, slots=tuple(start + i for i in frames))


class WindowPolicy:
    """Keep ``sink_frames`` first frames forever plus the last ``window_frames`` frames (LongLive).

    The window part is a ring buffer: the oldest window frame is overwritten by the newest one.
    Attention of a block therefore sees the sinks, the ``window_frames`` frames before the block,
    and the block itself (:func:`mag.models.attention.sink_window_mask` is the equivalent
    full-sequence mask).
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

    def plan(self, cache: CacheState, num_block_frames: int) -> WritePlan:
        if num_block_frames > self.window_frames:
            raise ConfigError(
                f"window policy keeps {self.window_frames} recent frames but a block has "
                f"{num_block_frames};"
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

    def plan(self, cache: CacheState, num_block_frames: int) -> WritePlan:
        seen = cache.frames_seen
        last = num_block_frames - 1
        frames = tuple(
            i for i in range(num_block_frames) if seen + i < self.sink_frames or i == last
        )
        start = cache.frames_retained
        slots = tuple(_ring_slot(start + j, self.sink_frames,
                                 self.memory_slots) for j in range(len(frames)))
        if max(slots) >= cache.capacity_frames:
            raise InputError(
                f"downsample KV cache holds {cache.capacity_frames} frames and is full; allocate"
                " capacity_frames(horizon) slots or set memory_slots for a bounded ring"
            )
        return WritePlan(frames=frames, slots=slots)


class MagPolicy(DownsamplePolicy):
    """MAG's compressed memory: :class:`DownsamplePolicy`'s plan, written by the memory model.

    The plan is unchanged (sinks in full, then each block's last frame at its own RoPE position;
    with ``memory_slots`` a ring of that many compressed frames whose oldest is evicted: the
    ``bounded`` variant). The write pass is run by the memory model, which the streaming generator
    is handed as its writer; the policy adds :meth:`memory_view`, the cached frames the memory model
    may read. Ours (``mag`` / ``bounded``) were trained to see only compressed frames, so
    uncompressed sinks are hidden from their write pass; the released MAG memory model reads the
    sinks like the generator does (``memory_sees_sinks``: the ``official`` geometry, 2 sinks + a
    ring of 21 at Wan scale).
    """

    def __init__(self, sink_frames: int = 0, memory_slots: int | None = None, *,
                 memory_sees_sinks: bool = False) -> None:
        super().__init__(sink_frames, memory_slots)
        self.memory_sees_sinks = memory_sees_sinks
        if memory_sees_sinks:
            if memory_slots is None:
                raise ConfigError("the official MAG geometry is a ring: give memory_slots")
            self.name = "official"
        else:
            self.name = "mag" if memory_slots is None else "bounded"

    def memory_view(self, cache: CacheState, frames_per_block: int) -> tuple[bool, ...] | None:
        """Per valid cached frame (read order): may the memory model attend to it? None: to all.

        Sinks occupy slots ``0..sink_frames-1`` and hold stream frames ``0..sink_frames-1`` (the
        first retained frames); unless ``memory_sees_sinks``, a sink that is not a block's last
        frame is hidden. Every other slot holds a block's last frame.
        """
        if self.memory_sees_sinks:
            return None
        hidden = {
            s for s in range(self.sink_frames) if s % frames_per_block != frames_per_block - 1
        }
        if hidden.isdisjoint(cache.valid_slots):
            return None
        return tuple(slot not in hidden for slot in cache.valid_slots)
