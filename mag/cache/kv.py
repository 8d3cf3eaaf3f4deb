"""Pre-allocated self-attention K/V storage for block-causal streaming.

During a block's denoising steps the model only reads the cache; one clean write pass at t=0 then
writes, layer by layer, the frames the policy (:mod:`mag.cache.policies`) retains, and
:meth:`KVCache.commit` marks them valid. Keys are stored after RoPE, so a frame keeps its temporal
position in any slot. Reads go in slot order; the valid slots are a prefix, so a read is a view.
Slot bookkeeping is host-side ints: planning and reading never sync the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mag.cache.policies import CachePolicy, WritePlan
from mag.config import DiTConfig
from mag.errors import ConfigError, InputError

# K and V are both cached.
KV_TENSORS = 2


def kv_bytes_per_frame(cfg: DiTConfig, tokens_per_frame: int, dtype: torch.dtype,
                       batch_size: int = 1) -> int:
    """K and V bytes of one cached latent frame over every layer and the batch."""
    return _frame_bytes(cfg.num_layers, batch_size, cfg.num_heads, tokens_per_frame, cfg.head_dim,
                        dtype.itemsize)


def _frame_bytes(layers: int, batch: int, heads: int, tokens: int, head_dim: int,
                 itemsize: int) -> int:
    return KV_TENSORS * layers * batch * heads * tokens * head_dim * itemsize


@dataclass(frozen=True)
class PendingWrite:
    """A write pass in progress: the plan plus device index tensors for one ``index_copy_`` per
    layer."""

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
    Host side: ``valid_slots`` (tuple of slot ids in read order), ``frames_seen``,
    ``frames_retained``. K/V are stored detached: gradients never flow through the cache (as in
    Self-Forcing).
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

    # -- per block (hooks of caches that re-assign positions: mag.cache.archive) ---------------

    def rope_position(self, frame_index: int) -> int:
        """RoPE temporal position at which stream frame ``frame_index`` is run: itself here."""
        return frame_index

    def prepare_block(self, frame_index: int, width_offsets: Tensor | None) -> None:
        """Called before block ``frame_index`` is denoised or written (camera ``width_offsets
        [B, F]`` or None); nothing to do for a plain cache."""

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def bytes_per_frame(self) -> int:
        """K and V bytes of one cached frame over all layers and the batch."""
        return _frame_bytes(self.num_layers, self.batch_size, self.num_heads, self.tokens_per_frame,
                            self.head_dim, self.k.element_size())

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

        Why: a frame mask that hides cached frames forces masked attention (no flash kernel on GPU,
        the grouped path on CPU). When the hidden frames are a prefix of the read order -- the
        uncompressed sinks that :meth:`MagPolicy.memory_view` hides from the memory model -- reading
        past them gives the same attention with no mask at all.
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

        Frames come in ``valid_slots`` (slot) order: a prefix of the slots is a view, other sets a
        gather; a frame mask over cached frames must use that order.
        """
        start = self._hidden_prefix * self.tokens_per_frame
        if self._read_index is None:
            end = len(self.valid_slots) * self.tokens_per_frame
            return self.k[layer, :, :, start:end], self.v[layer, :, :, start:end]
        index = self._read_index[start:]
        return self.k[layer].index_select(2, index), self.v[layer].index_select(2, index)

    def cached_positions(self) -> Tensor:
        """``[valid_frames]`` RoPE temporal index of each cached frame, in read order (device
        tensor)."""
        return self.slot_positions[list(self.valid_slots)[self._hidden_prefix:]]

    # -- write ---------------------------------------------------------------------------------

    def begin_write(self, num_block_frames: int) -> PendingWrite:
        """Ask the policy where the block's retained frames go; nothing changes until
        :meth:`commit`."""
        plan = self.policy.plan(self, num_block_frames)
        in_range = all(0 <= s < self.capacity_frames for s in plan.slots)
        if len(set(plan.slots)) != len(plan.slots) or not in_range:
            raise ConfigError(f"policy {self.policy.name!r} planned invalid slots {plan.slots}"
                              f" for a cache of {self.capacity_frames} frames")
        tokens = torch.arange(self.tokens_per_frame)
        source = torch.cat([f * self.tokens_per_frame + tokens for f in plan.frames])
        dest = torch.cat([s * self.tokens_per_frame + tokens for s in plan.slots])
        # Built on the host, copied without blocking: a blocking copy would make the host wait for
        # the device.
        indices = (source, dest, torch.tensor(plan.frames), torch.tensor(plan.slots))
        device = self.k.device
        return PendingWrite(plan, num_block_frames, *(i.to(device,
                                                           non_blocking=True) for i in indices))

    def write(self, layer: int, k: Tensor, v: Tensor, pending: PendingWrite) -> None:
        """Store the block's retained frames of post-RoPE ``k``, ``v``: ``[B, heads, F*tokens,
        head_dim]``."""
        for store, new in ((self.k, k), (self.v, v)):
            kept = new.detach().index_select(2, pending.source_tokens).to(store.dtype)
            store[layer].index_copy_(2, pending.dest_tokens, kept)

    def commit(self, pending: PendingWrite, frame_positions: Tensor) -> None:
        """Mark the written slots valid (evicting what they held) once every layer has been written.

        Args:
            frame_positions: ``[F]`` long, RoPE temporal index of each frame of the block.
        """
        plan = pending.plan
        self.slot_positions.index_copy_(0, pending.dest_slots,
                                        frame_positions.to(self.slot_positions.device)
                                        [pending.kept_frames])
        self._mark_valid(plan.slots)
        self.frames_seen += pending.num_block_frames
        self.frames_retained += len(plan.frames)

    def _mark_valid(self, slots: Sequence[int]) -> None:
        """Mark ``slots`` valid and rebuild the read order (host ints; a non-blocking copy)."""
        for slot in slots:
            self._valid[slot] = True
        self.valid_slots = tuple(i for i, ok in enumerate(self._valid) if ok)
        self._read_index = self._make_read_index()

    def _make_read_index(self) -> Tensor | None:
        """None when the valid slots are a prefix (read is a slice), else token indices to
        gather."""
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
                f"KV cache was built for batch {self.batch_size}, {self.tokens_per_frame} "
                "tokens/frame,"
                f" {self.num_layers} layers; the forward has batch {batch_size}, {tokens_per_frame}"
                f" tokens/frame, {layers} layers"
            )


def valid_slot_positions(cache: KVCache) -> Sequence[int]:
    """Host-side helper for tests and reports: positions of the cached frames (syncs; not for hot
    loops)."""
    return cache.cached_positions().tolist()


__all__ = ["KV_TENSORS", "KVCache", "PendingWrite", "kv_bytes_per_frame", "valid_slot_positions"]
