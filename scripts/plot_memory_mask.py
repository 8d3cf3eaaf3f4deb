"""Draw the memory model's training mask (docs/img/memory_mask.png).

:func:`mag.memory.memory_training_mask` over ``[clean ; noisy]`` for a few blocks, allowed pairs
coloured by the kind of key, the retained (last) frame of each block in dark blue.

Usage: ``.venv/bin/python scripts/plot_memory_mask.py [-o docs/img/memory_mask.png] [--blocks 4]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mag.io.files import save_figure  # noqa: E402
from mag.memory import memory_training_mask  # noqa: E402

FRAMES_PER_BLOCK = 3
DEFAULT_BLOCKS = 4
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "memory_mask.png"
# Colours: clean keys, noisy keys, masked out; retained frames get a darker clean colour.
CLEAN, RETAINED, NOISY, MASKED = (0.55, 0.75, 0.95), (0.10, 0.35, 0.75), (0.95, 0.60, 0.30), (1.0,
                                                                                              1.0,
                                                                                              1.0)
DPI = 150


def mask_image(num_blocks: int) -> np.ndarray:
    """RGB ``[2N, 2N, 3]``: allowed (query, key) pairs coloured by the kind of key."""
    n = num_blocks * FRAMES_PER_BLOCK
    mask = memory_training_mask(n, FRAMES_PER_BLOCK).numpy()
    key_colour = np.array([RETAINED if k % FRAMES_PER_BLOCK == FRAMES_PER_BLOCK - 1 else CLEAN
                           for k in range(n)] + [NOISY] * n)
    image = np.where(mask[:, :, None], key_colour[None, :, :], np.array(MASKED)[None, None, :])
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS)
    args = parser.parse_args()
    n = args.blocks * FRAMES_PER_BLOCK
    labels = [f"c{i}" for i in range(n)] + [f"n{i}" for i in range(n)]

    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    ax.imshow(mask_image(args.blocks), interpolation="nearest")
    for edge in range(0, 2 * n + 1, FRAMES_PER_BLOCK):
        width = 2.0 if edge % n == 0 else 0.6
        ax.axhline(edge - 0.5, color="black", lw=width)
        ax.axvline(edge - 0.5, color="black", lw=width)
    ax.set_xticks(range(2 * n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(2 * n), labels, fontsize=7)
    ax.set_xlabel("keys: clean frames c | noisy frames n")
    ax.set_ylabel("queries")
    ax.set_title(f"memory training mask, {args.blocks} blocks of {FRAMES_PER_BLOCK} frames\n"
                 "dark blue = retained (last) clean frame: the block's compressed memory",
                 fontsize=9)
    # Quadrant notes sit in cells the mask leaves empty (fractions of the [2N, 2N] picture).
    for (row, col), text in {(0.07, 0.36): "clean -> clean\nown block + earlier\nretained frames",
                             (0.25, 0.75): "clean -> noisy\nnever",
                             (0.57, 0.32): "noisy -> clean\nretained frames of\nblocks <= own",
                             (0.93, 0.62): "noisy -> noisy\nown block"}.items():
        ax.text(col * 2 * n - 0.5, row * 2 * n - 0.5, text, ha="center", va="center", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": "grey"})
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out, dpi=DPI)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
