"""Self-attention KV cache for block-causal streaming: storage, policies and host-side
accounting."""

from mag.cache.accounting import PlanReplay, retained_bytes, retained_frames
from mag.cache.archive import ArchiveCache, ArchivePolicy, new_cache
from mag.cache.kv import KV_TENSORS, KVCache, PendingWrite, kv_bytes_per_frame, valid_slot_positions
from mag.cache.policies import (
    CachePolicy,
    CacheState,
    DownsamplePolicy,
    FullPolicy,
    MagPolicy,
    WindowPolicy,
    WritePlan,
)

__all__ = ["KV_TENSORS", "ArchiveCache", "ArchivePolicy", "CachePolicy", "CacheState",
           "DownsamplePolicy", "FullPolicy", "KVCache", "MagPolicy", "PendingWrite", "PlanReplay",
           "WindowPolicy", "WritePlan", "kv_bytes_per_frame", "new_cache", "retained_bytes",
           "retained_frames", "valid_slot_positions"]
