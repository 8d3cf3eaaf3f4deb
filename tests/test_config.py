import pytest

from mag.config import PRESETS, get_preset, preset_from_dict
from mag.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip_through_dict(name):
    preset = get_preset(name)
    assert preset_from_dict(preset.to_dict()) == preset


def test_wan_preset_has_the_published_shapes():
    p = get_preset("wan-1.3b")
    shapes = (p.dit.dim, p.dit.num_layers, p.dit.num_heads, p.dit.ffn_dim, p.dit.text_dim)
    assert shapes == (1536, 30, 12, 8960, 4096)
    assert p.tokens_per_frame == 1560  # 60 x 104 latents at 480x832, patch 2x2


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match="valid presets: tiny, wan-1.3b"):
        get_preset("huge")


def test_dotted_overrides_and_bad_values():
    assert get_preset("tiny", **{"dit.num_layers": 2}).dit.num_layers == 2
    with pytest.raises(ConfigError, match="divisible"):
        get_preset("tiny", **{"dit.num_heads": 3})
    with pytest.raises(ConfigError, match="no field 'nope'"):
        get_preset("tiny", **{"dit.nope": 1})
    with pytest.raises(ConfigError, match="positive"):
        get_preset("tiny", **{"cache.window_frames": 0})
    for field in ("sink_frames", "memory_sink_frames"):
        with pytest.raises(ConfigError, match=f"cache.{field} must be >= 0, got -1"):
            get_preset("tiny", **{f"cache.{field}": -1})
