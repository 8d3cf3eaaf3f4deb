"""Two-tier compressed memory (policy ``archive``): a GPU ring plus a host archive, with positions
re-assigned per block.

GPU slots: the uncompressed sinks, a ring of ``ring_slots`` compressed frames, and
``retrieval_slots`` into which each block copies the archived frames (evicted from the ring) that
cover most of its camera's field of view, greedily, then overlap it most (without a camera: the most
similar content). A block
reads them at re-assigned temporal positions: sinks, retrieved frames (oldest first, one block
apart), ring, current block, the block at ``min(frame, reference_frames)``; so no distance the
model reads exceeds ``reference_frames + block``, however long the stream. Keys stay as written;
reads rotate them by ``assigned - stored``. Until the ring first evicts, this is ``bounded``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mag.cache.kv import KVCache, PendingWrite
from mag.cache.policies import CachePolicy, MagPolicy
from mag.cache.rotary import rotate_pairs, temporal_shift_tables
from mag.cache.store import FrameArchive
from mag.config import DiTConfig
from mag.errors import ConfigError, InputError

# Bytes in a MiB (the host budget is given in MiB).
MIB = 1 << 20
# No stored frame yet in a slot.
EMPTY = -1


class ArchivePolicy(MagPolicy):
    """Plan of ``bounded`` with a ring of ``ring_slots``, plus ``retrieval_slots`` GPU slots that
    :class:`ArchiveCache` fills from the archive (see the module docstring)."""

    def __init__(self, sink_frames: int, ring_slots: int, retrieval_slots: int, *,
                 host_mib: int = 4096, spill_dir: str | Path | None = None) -> None:
        super().__init__(sink_frames, ring_slots)
        if retrieval_slots <= 0 or host_mib < 0:
            raise ConfigError(f"the archive policy needs retrieval_slots > 0 and host_mib >= 0,"
                              f" got {retrieval_slots}, {host_mib}")
        self.name = "archive"
        self.ring_slots = ring_slots
        self.retrieval_slots = retrieval_slots
        self.host_mib = host_mib
        self.spill_dir = spill_dir

    def capacity_frames(self, horizon_frames: int, frames_per_block: int) -> int:
        return self.sink_frames + self.ring_slots + self.retrieval_slots

    def first_compressed_frame(self, frames_per_block: int) -> int:
        """Stream index of the first frame the ring keeps (the last frame of the first block after
        the sinks)."""
        first_block = math.ceil(self.sink_frames / frames_per_block)
        return first_block * frames_per_block + frames_per_block - 1

    def reference_frames(self, frames_per_block: int) -> int:
        """RoPE position of the current block once the stream is long: the smallest block start at
        which sinks, a full retrieval and a full ring fit at positions >= 0."""
        slots = self.ring_slots + self.retrieval_slots
        span = self.first_compressed_frame(frames_per_block) + frames_per_block * (slots - 1) + 1
        return math.ceil(span / frames_per_block) * frames_per_block


class ArchiveCache(KVCache):
    """A :class:`KVCache` under :class:`ArchivePolicy` (see the module docstring).

    Host state per slot: ``slot_frames [B, capacity]`` (stream frame index of each slot's frame)
    and ``slot_stored [B, capacity]`` (the RoPE position its key was rotated with). The camera of
    a block (``width_offsets`` in patches, host) is given to :meth:`prepare_block`; without one,
    retrieval ranks archived frames by the cosine similarity of their mean values to the newest
    ring frame's (one device-to-host copy per block).
    """

    def __init__(self, policy: ArchivePolicy, *, rope_theta: float, frames_per_block: int,
                 view_width: int, **kwargs: object) -> None:
        if not isinstance(policy, ArchivePolicy):
            raise ConfigError(f"ArchiveCache needs the archive policy, got {policy.name!r}")
        self.rope_theta = rope_theta
        self.frames_per_block = frames_per_block
        self.view_width = view_width
        super().__init__(policy, **kwargs)  # type: ignore[arg-type]
        device = self.k.device
        self.archive = FrameArchive(
            (self.num_layers, self.batch_size, self.num_heads, self.tokens_per_frame,
             self.head_dim), self.k.dtype, pin=device.type == "cuda",
            host_bytes=policy.host_mib * MIB, spill_dir=policy.spill_dir)

    @classmethod
    def for_config(cls, cfg: DiTConfig, policy: ArchivePolicy, *, tokens_per_frame: int,
                   view_width: int, frames_per_block: int, batch_size: int = 1,
                   dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> ArchiveCache:
        return cls(policy, rope_theta=cfg.rope_theta, frames_per_block=frames_per_block,
                   view_width=view_width, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                   head_dim=cfg.head_dim, tokens_per_frame=tokens_per_frame,
                   capacity_frames=policy.capacity_frames(0, frames_per_block),
                   batch_size=batch_size, dtype=dtype, device=device)

    def reset(self) -> None:
        super().reset()
        shape = (self.batch_size, self.capacity_frames)
        self.slot_frames = np.full(shape, EMPTY, dtype=np.int64)
        self.slot_stored = np.full(shape, EMPTY, dtype=np.int64)
        self.retrieved = np.full((self.batch_size, self._policy.retrieval_slots), EMPTY,
                                 dtype=np.int64)  # archive id in each retrieval slot
        self._block_camera: np.ndarray | None = None
        self._slot_camera: dict[int, np.ndarray] = {}  # [B] camera of a slot's frame
        self._prepared_for = EMPTY
        self._rotation: tuple[Tensor, Tensor] | None = None
        if hasattr(self, "archive"):
            self.archive.clear()

    @property
    def _policy(self) -> ArchivePolicy:
        assert isinstance(self.policy, ArchivePolicy)
        return self.policy

    # -- positions -----------------------------------------------------------------------------

    def rope_position(self, frame_index: int) -> int:
        return min(frame_index, self._policy.reference_frames(self.frames_per_block))

    def assigned_positions(self) -> np.ndarray:
        """``[B, valid]`` positions each cached frame (read order) is read at for the prepared
        block."""
        policy, block = self._policy, self.frames_per_block
        start = self._prepared_for
        current = self.rope_position(start)
        slots = list(self.valid_slots)
        frames = self.slot_frames[:, slots]
        assigned = current - (start - frames)  # true distances (ring; everything before eviction)
        sinks = policy.sink_frames
        ring_end = sinks + policy.ring_slots
        retrieved = [i for i, s in enumerate(slots) if s >= ring_end]
        if retrieved:
            ring = [i for i, s in enumerate(slots) if sinks <= s < ring_end]
            oldest_ring = assigned[:, ring].min(axis=1)
            count = len(retrieved)
            order = np.argsort(frames[:, retrieved], axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(count)[None, :].repeat(len(order), 0), axis=1)
            assigned[:, retrieved] = oldest_ring[:, None] - block * (count - rank)
            oldest = assigned[:, retrieved].min(axis=1)
            first = policy.first_compressed_frame(block)
            sink_columns = [i for i, s in enumerate(slots) if s < sinks]
            assigned[:, sink_columns] = oldest[:, None] - (first - frames[:, sink_columns])
        return assigned

    # -- per block -----------------------------------------------------------------------------

    def prepare_block(self, frame_index: int, width_offsets: Tensor | None) -> None:
        """Before block ``frame_index`` is denoised or written: fill the retrieval slots for its
        camera (``width_offsets [B, F]`` patches, or None) and set the read rotation."""
        if frame_index == self._prepared_for:
            return
        if frame_index != self.frames_seen:
            raise InputError(f"block at frame {frame_index} prepared, the cache is at frame "
                             f"{self.frames_seen}")
        self._prepared_for = frame_index
        self._block_camera = (None if width_offsets is None
                              else width_offsets.detach().cpu().double().numpy())
        if len(self.archive):
            self._retrieve()
        shifts = self.assigned_positions() - self.slot_stored[:, list(self.valid_slots)]
        self._rotation = None
        if shifts.any():
            self._rotation = temporal_shift_tables(
                torch.from_numpy(shifts).to(self.k.device), self.tokens_per_frame, self.head_dim,
                self.rope_theta)

    def _scores(self) -> np.ndarray:
        """``[B, archived]`` how well each archived frame suits the block (higher is better)."""
        archive = self.archive
        seen = archive.cameras.view().T  # [B, N]
        if self._block_camera is not None and not np.isnan(seen).any():
            distance = np.abs(seen[:, :, None] - self._block_camera[:, None, :])  # [B, N, F]
            return np.clip(self.view_width - distance, 0, None).max(axis=2)
        if archive.descriptors.count != len(archive):
            raise InputError("the archive holds frames with a camera and the block has none: give"
                             " width_offsets for every block of a stream, or for none")
        stored = archive.descriptors.view()  # [N, B, D]
        # Centred cosine: what every frame shares (biases, the prompt) says nothing about views.
        # (s - c).(q - c) and |s - c| from s.q, s.c and |s|^2: one pass over the archive.
        centre = stored.mean(axis=0)  # [B, D]
        query = self._descriptor(self._newest_ring_slot()) - centre  # [B, D]
        dots = np.einsum("nbd,bkd->nbk", stored, np.stack([query, centre], axis=1))
        along, shared = dots[..., 0], dots[..., 1]  # s.q, s.c: [N, B]
        squared = np.einsum("nbd,nbd->nb", stored, stored)
        centred_sq = np.maximum(squared - 2 * shared + (centre * centre).sum(1), 0)
        cosine_top = along - (centre * query).sum(1)
        norms = np.sqrt(centred_sq) * np.linalg.norm(query, axis=1)
        return (cosine_top / np.maximum(norms, np.finfo(np.float32).tiny)).T

    def _retrieve(self) -> None:
        """Copy the chosen archived frames into the retrieval slots (frames already there stay)."""
        policy = self._policy
        count = min(policy.retrieval_slots, len(self.archive))
        scores = self._scores()
        seen = self.archive.cameras.view().T  # [B, N]
        by_view = self._block_camera is not None and not np.isnan(seen).any()
        first_slot = policy.sink_frames + policy.ring_slots
        for b in range(self.batch_size):
            chosen = (coverage_order(seen[b], self._block_camera[b], self.view_width, scores[b],
                                     count) if by_view
                      else np.lexsort((-np.arange(scores.shape[1]), -scores[b]))[:count])
            wanted = set(chosen.tolist())
            current = self.retrieved[b, :count]
            keep = {int(i) for i in current if i in wanted}
            free = [j for j in range(count) if current[j] not in keep]
            for j, index in zip(free, sorted(wanted - keep), strict=True):
                kv = self.archive.frame(index, b).to(self.k.device, non_blocking=True)
                span = self._span(first_slot + j)
                self.k[:, b, :, span] = kv[0]
                self.v[:, b, :, span] = kv[1]
                self.retrieved[b, j] = index
                self.slot_frames[b, first_slot + j] = self.archive.frame_indices[index]
                self.slot_stored[b, first_slot + j] = self.archive.stored_positions[index]
        self._mark_valid(range(first_slot, first_slot + count))

    def _newest_ring_slot(self) -> int:
        ring = range(self._policy.sink_frames, self._policy.sink_frames + self._policy.ring_slots)
        return max(ring, key=lambda s: self.slot_frames[0, s])

    def _descriptor(self, slot: int) -> np.ndarray:
        """``[B, layers * head_dim]`` value of a slot's frame averaged over tokens and heads (values
        carry no RoPE, so frames stored at different positions compare by content; syncs)."""
        mean = self.v[:, :, :, self._span(slot)].float().mean(dim=(2, 3))  # [L, B, D]
        return mean.transpose(0, 1).flatten(1).cpu().numpy()

    # -- write ---------------------------------------------------------------------------------

    def begin_write(self, num_block_frames: int) -> PendingWrite:
        """Plan as ``bounded``; a ring frame about to be overwritten goes to the archive first."""
        if self._prepared_for != self.frames_seen:
            self.prepare_block(self.frames_seen, None)
        pending = super().begin_write(num_block_frames)
        ring_start = self._policy.sink_frames
        for slot in pending.plan.slots:
            if slot >= ring_start and self._valid[slot]:
                self._archive_slot(slot)
        return pending

    def _span(self, slot: int) -> slice:
        """The tokens of ``slot`` in the K/V storage."""
        return slice(slot * self.tokens_per_frame, (slot + 1) * self.tokens_per_frame)

    def _archive_slot(self, slot: int) -> None:
        span = self._span(slot)
        camera = self._slot_camera.get(slot)
        self.archive.append(self.k[:, :, :, span], self.v[:, :, :, span],
                            stored_position=int(self.slot_stored[0, slot]),
                            frame_index=int(self.slot_frames[0, slot]), camera=camera,
                            descriptor=None if camera is not None else self._descriptor(slot))

    def commit(self, pending: PendingWrite, frame_positions: Tensor) -> None:
        start, stored = self.frames_seen, self.rope_position(self.frames_seen)
        super().commit(pending, frame_positions)
        self._rotation = None
        for frame, slot in zip(pending.plan.frames, pending.plan.slots, strict=True):
            self.slot_frames[:, slot] = start + frame
            self.slot_stored[:, slot] = stored + frame
            if self._block_camera is None:
                self._slot_camera.pop(slot, None)
            else:
                self._slot_camera[slot] = self._block_camera[:, frame].copy()

    # -- read ----------------------------------------------------------------------------------

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        if self._prepared_for != self.frames_seen:
            self.prepare_block(self.frames_seen, None)
        k, v = super().read(layer)
        if self._rotation is None:
            return k, v
        hidden = self._hidden_prefix * self.tokens_per_frame
        cos, sin = (t[:, None, hidden:] for t in self._rotation)
        return rotate_pairs(k, cos, sin), v


def coverage_order(cameras: np.ndarray, block: np.ndarray, view_width: int, scores: np.ndarray,
                   count: int) -> np.ndarray:
    """``count`` archived frames for a block, greedily: each pick shows the most columns of the
    block's view (``block: [F]`` cameras, in patches) that no earlier pick shows; once nothing is
    left to show, the highest ``scores``. Ties go to the higher score, then the newer frame.

    Frames that saw the same place on different sweeps are near duplicates: top-k by overlap alone
    can fill every slot with one view while part of the block's view goes unseen.
    """
    low = np.floor(block.min())
    columns = low + np.arange(int(np.ceil(block.max()) - low) + view_width) + 0.5  # [C] centres
    inside = (columns[None, :] >= block[:, None]) & (columns[None, :] < block[:, None] + view_width)
    needed = inside.any(axis=0)  # [C] columns the block shows
    shows = ((columns[None, :] >= cameras[:, None])
             & (columns[None, :] < cameras[:, None] + view_width) & needed)  # [N, C]
    newest = np.arange(len(cameras))
    chosen: list[int] = []
    covered = np.zeros_like(needed)
    for _ in range(count):
        gain = (shows & ~covered).sum(axis=1).astype(np.float64)
        gain[chosen] = -1
        order = np.lexsort((-newest, -scores, -gain))
        pick = int(order[0])
        chosen.append(pick)
        covered |= shows[pick]
    return np.asarray(chosen, dtype=np.int64)


def new_cache(cfg: DiTConfig, policy: CachePolicy, *, tokens_per_frame: int, view_width: int,
              horizon_frames: int, frames_per_block: int, batch_size: int = 1,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
    """The cache a stream under ``policy`` needs: an :class:`ArchiveCache` for ``archive``, else a
    :class:`KVCache` sized for ``horizon_frames``. ``view_width``: patches across one frame."""
    if isinstance(policy, ArchivePolicy):
        return ArchiveCache.for_config(cfg, policy, tokens_per_frame=tokens_per_frame,
                                       view_width=view_width, frames_per_block=frames_per_block,
                                       batch_size=batch_size, dtype=dtype, device=device)
    return KVCache.for_model(cfg, policy, tokens_per_frame=tokens_per_frame,
                             horizon_frames=horizon_frames, frames_per_block=frames_per_block,
                             batch_size=batch_size, dtype=dtype, device=device)


__all__ = ["ArchiveCache", "ArchivePolicy", "coverage_order", "new_cache"]
