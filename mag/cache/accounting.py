"""KV accounting without allocating a cache: a host-only replay of a policy's write plans.

Replaying ``plan`` block by block gives exactly the valid slots a real
:class:`~mag.cache.kv.KVCache` would hold (tested against streamed caches), so the KV size of a
10,000-frame stream costs milliseconds.
"""

from __future__ import annotations

import torch

from mag.cache.archive import ArchivePolicy
from mag.cache.kv import kv_bytes_per_frame
from mag.cache.policies import CachePolicy
from mag.config import Preset


class PlanReplay:
    """The :class:`~mag.cache.policies.CacheState` counters of a cache, advanced by the policy's
    plans."""

    def __init__(self, policy: CachePolicy, capacity_frames: int) -> None:
        self.policy = policy
        self.capacity_frames = capacity_frames
        self.frames_seen = 0
        self.frames_retained = 0
        self.valid: set[int] = set()

    @property
    def valid_slots(self) -> tuple[int, ...]:
        return tuple(sorted(self.valid))

    def add_block(self, num_block_frames: int) -> None:
        plan = self.policy.plan(self, num_block_frames)
        if isinstance(self.policy, ArchivePolicy):
            # A ring frame written over goes to the archive; the next block fills one more
            # retrieval slot from it (until all are in use).
            evicted = len(self.valid.intersection(plan.slots))
            first = self.policy.sink_frames + self.policy.ring_slots
            filled = sum(1 for s in self.valid if s >= first)
            self.valid.update(range(first, first + min(self.policy.retrieval_slots,
                                                       filled + evicted)))
        self.valid.update(plan.slots)
        self.frames_seen += num_block_frames
        self.frames_retained += len(plan.frames)


def retained_frames(policy: CachePolicy, preset: Preset, latent_horizons: list[int]) -> list[int]:
    """Valid cached frames after each of ``latent_horizons`` (latent frames, whole blocks, any
    order)."""
    block = preset.cache.frames_per_block
    if not latent_horizons:
        return []
    replay = PlanReplay(policy, policy.capacity_frames(max(latent_horizons), block))
    counts: dict[int, int] = {}
    for horizon in sorted(latent_horizons):
        while replay.frames_seen < horizon:
            replay.add_block(block)
        counts[horizon] = len(replay.valid)
    return [counts[h] for h in latent_horizons]


def retained_bytes(policy: CachePolicy, preset: Preset, dtype: torch.dtype,
                   latent_horizons: list[int]) -> list[int]:
    """K/V bytes a batch-1 cache holds after each of ``latent_horizons`` latent frames."""
    per_frame = kv_bytes_per_frame(preset.dit, preset.tokens_per_frame, dtype)
    return [n * per_frame for n in retained_frames(policy, preset, latent_horizons)]


__all__ = ["PlanReplay", "retained_bytes", "retained_frames"]
