"""Themes of the panorama world: the colours, shapes and prompt words of each kind of panorama.

A theme fixes the look (palette, gradient, stripes, texture) and the words of the prompt; the layout
of one panorama is drawn from its seed in :mod:`mag.world.panorama`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RGB", "THEMES", "StripeStyle", "Theme"]

RGB = tuple[int, int, int]
StripeStyle = Literal["none", "vertical", "horizontal"]


@dataclass(frozen=True)
class Theme:
    """Look of one kind of panorama; the prompt describes the theme, never the layout.

    Attributes:
        name: short name, also the key in :data:`THEMES`.
        scene: prompt fragment naming the scene (``"desert at dusk with dunes and cacti"``).
        adjectives: words the prompt draws one or two of, per seed.
        sky_top / sky_bottom: background gradient colours, top row to bottom row.
        ground: colour below the horizon.
        ground_fraction: share of the height under the horizon (0 = no ground band).
        palette: colours the flat shapes are painted in.
        shape_weights: relative frequency of rectangles, ellipses and triangles.
        stripes: stripe patches drawn vertically, horizontally, or none.
        stripe_color: colour of the stripes.
        texture_levels: standard deviation (uint8 levels) of the per-pixel luminance noise.
    """

    name: str
    scene: str
    adjectives: tuple[str, ...]
    sky_top: RGB
    sky_bottom: RGB
    ground: RGB
    ground_fraction: float
    palette: tuple[RGB, ...]
    shape_weights: tuple[float, float, float]
    stripes: StripeStyle
    stripe_color: RGB
    texture_levels: float


THEMES: dict[str, Theme] = {
    theme.name: theme
    for theme in (
        Theme(
            name="desert at dusk",
            scene="desert at dusk with dunes, rocks and cacti",
            adjectives=("quiet", "warm", "dusty", "endless", "golden"),
            sky_top=(70, 40, 110), sky_bottom=(240, 140, 80), ground=(200, 150, 90),
            ground_fraction=0.3,
            palette=((110, 150, 70), (150, 90, 60), (230, 190, 120), (90, 60, 50), (250, 220, 160)),
            shape_weights=(0.3, 0.3, 0.4), stripes="horizontal", stripe_color=(180, 120, 70),
            texture_levels=5.0,
        ),
        Theme(
            name="underwater reef",
            scene="underwater coral reef with fish and sea plants",
            adjectives=("calm", "deep", "sunlit", "colourful", "tropical"),
            sky_top=(20, 90, 150), sky_bottom=(10, 40, 90), ground=(200, 180, 130),
            ground_fraction=0.2,
            palette=((250, 110, 90), (250, 200, 60), (120, 220, 200), (200, 90, 180), (250, 250,
                                                                                       240)),
            shape_weights=(0.15, 0.6, 0.25), stripes="vertical", stripe_color=(60, 160, 120),
            texture_levels=6.0,
        ),
        Theme(
            name="neon city",
            scene="neon city street at night with glowing signs and towers",
            adjectives=("rainy", "busy", "futuristic", "electric", "late-night"),
            sky_top=(10, 10, 30), sky_bottom=(40, 20, 70), ground=(30, 30, 40),
            ground_fraction=0.15,
            palette=((255, 40, 180), (40, 240, 255), (250, 240, 60), (120, 60, 255), (60, 255,
                                                                                      120)),
            shape_weights=(0.7, 0.15, 0.15), stripes="vertical", stripe_color=(90, 90, 120),
            texture_levels=4.0,
        ),
        Theme(
            name="snowy forest",
            scene="snowy forest with pine trees and frozen hills",
            adjectives=("silent", "frosty", "misty", "wintry", "peaceful"),
            sky_top=(160, 190, 220), sky_bottom=(230, 235, 245), ground=(245, 248, 252),
            ground_fraction=0.3,
            palette=((30, 80, 50), (60, 110, 70), (120, 80, 50), (180, 200, 220), (90, 100, 120)),
            shape_weights=(0.15, 0.25, 0.6), stripes="none", stripe_color=(200, 210, 225),
            texture_levels=3.0,
        ),
        Theme(
            name="autumn park",
            scene="autumn park with trees, benches and fallen leaves",
            adjectives=("crisp", "sunny", "golden", "breezy", "cosy"),
            sky_top=(110, 160, 220), sky_bottom=(200, 220, 235), ground=(120, 140, 60),
            ground_fraction=0.3,
            palette=((220, 90, 30), (240, 180, 40), (160, 40, 30), (110, 70, 40), (90, 130, 50)),
            shape_weights=(0.25, 0.5, 0.25), stripes="horizontal", stripe_color=(140, 100, 60),
            texture_levels=6.0,
        ),
        Theme(
            name="lava cave",
            scene="lava cave with glowing rivers and dark rock",
            adjectives=("smouldering", "gloomy", "fiery", "ancient", "volcanic"),
            sky_top=(25, 15, 15), sky_bottom=(70, 30, 20), ground=(230, 90, 20),
            ground_fraction=0.2,
            palette=((255, 140, 20), (255, 220, 80), (60, 40, 40), (120, 50, 40), (200, 40, 20)),
            shape_weights=(0.35, 0.3, 0.35), stripes="vertical", stripe_color=(90, 40, 30),
            texture_levels=7.0,
        ),
    )
}
