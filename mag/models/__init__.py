"""The Wan2.1-architecture block-causal DiT and its building blocks."""

from mag.models.attention import (
    CrossAttentionCache,
    block_causal_mask,
    last_frame_memory_mask,
    sink_window_mask,
)
from mag.models.dit import WanDiT, count_parameters

__all__ = ["CrossAttentionCache", "WanDiT", "block_causal_mask", "count_parameters",
           "last_frame_memory_mask", "sink_window_mask"]
