"""Loading Wan2.1 / diffusers / Self-Forcing weights into :class:`mag.models.WanDiT` (one path for
all)."""

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
from mag.weights.sources import (
    MAG_MODEL_FORMAT,
    SOURCE_KINDS,
    ExternalDiT,
    WeightSource,
    detect_source,
    dit_fields_from_state,
    read_external_dit,
)

__all__ = ["MAG_MODEL_FORMAT", "SOURCE_KINDS", "ExternalDiT", "WeightSource", "detect_format",
           "detect_source", "diffusers_to_wan", "dit_fields_from_state", "load_into",
           "load_state_dict_any",
           "nonfinite_keys", "read_checkpoint_file", "read_external_dit", "require_finite",
           "unwrap_training_checkpoint", "wan_to_diffusers"]
