"""Prompt files for the data-free stages (Self-Forcing DMD, MAG stage 2): one prompt per line.

Sample ``i`` of micro-batch ``micro`` of ``step`` is a pure function of ``(seed, step, micro, i)``
(a keyed draw with replacement, like the world clips), so every rank reads its own slice of the same
global batch in a fixed order and a resumed run draws exactly the prompts the uninterrupted run
would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mag.errors import InputError


@dataclass
class PromptBatch:
    """Prompts of one micro-batch and a zero camera track ``[B, F]`` (prompt data carry no
    camera)."""

    prompts: list[str]
    camera_px: Tensor


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file; InputError when missing or empty."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read prompt file {path}: {err}") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts (one per line)")
    return prompts


class PromptFileSource:
    """Draws :class:`PromptBatch`es from a prompt file (same ``batch`` interface as the world
    clips)."""

    def __init__(self, path: str | Path, num_frames: int, seed: int) -> None:
        self.prompts = read_prompt_file(path)
        self.num_frames = num_frames
        self.seed = seed

    def index(self, step: int, micro: int, sample: int) -> int:
        """Line of sample ``sample`` of micro-batch ``micro`` of ``step``."""
        return int(np.random.default_rng([self.seed, step, micro,
                                          sample]).integers(len(self.prompts)))

    def batch(self, step: int, micro: int, indices: range) -> PromptBatch:
        prompts = [self.prompts[self.index(step, micro, i)] for i in indices]
        return PromptBatch(prompts, torch.zeros(len(prompts), self.num_frames))
