"""Loading Wan2.1 / diffusers / Self-Forcing weights into :class:`mag.models.WanDiT` (one path for all)."""

from mag.weights.keymap import diffusers_to_wan, wan_to_diffusers
from mag.weights.load import (
    detect_format,
    load_into,
    load_state_dict_any,
    nonfinite_keys,
    read_checkpoint_file,
    require_finite,
    unwrap_training_checkpoint,
)

__all__ = ["detect_format", "diffusers_to_wan", "load_into", "load_state_dict_any", "nonfinite_keys",
           "read_checkpoint_file", "require_finite", "unwrap_training_checkpoint", "wan_to_diffusers"]
