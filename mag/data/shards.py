"""Latent shards: VAE latents (+ text embeddings) of real videos, and the streaming loader that
reads them.

A shard folder holds ``index.json`` and ``shard_XXXXX.safetensors`` files, each with ``latents``
``[n, F, C, h, w]``, optionally ``context`` ``[n, L, D]`` (text-encoder states), and the clips'
prompts and source files as metadata; with contexts, ``empty_context.safetensors`` (named by the
index) holds the empty prompt's ``[1, L, D]``, so training needs no text encoder. Shard ``k`` holds
rows ``[k * shard_size, (k + 1) * shard_size)`` of the captions file, so a writer resumes by
skipping complete shards (each is written to ``*.tmp`` and renamed). The loader reads one row at a
time (safetensors slices, no whole-shard load) in an order that is a pure function of ``(seed, step,
micro, index)``: global sample ``n`` of the run is row ``perm_e[n mod N]`` of epoch ``e = n div N``,
so every clip is seen once per epoch, ranks take disjoint slices of each global batch, and a resumed
run reads exactly what the uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from mag.errors import InputError

SHARDS_FORMAT = "mag-latent-shards-v1"
INDEX_FILE = "index.json"
LATENTS, CONTEXT = "latents", "context"
EMPTY_FILE = "empty_context.safetensors"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


@dataclass
class LatentBatch:
    """Latent clips ``video: [B, F, C, h, w]``, prompts, and zero camera tracks ``[B, F]``."""

    video: Tensor
    offsets: Tensor
    camera_px: Tensor
    prompts: list[str]
    context: Tensor | None = None


def write_shard(folder: Path, k: int, latents: Tensor, prompts: list[str], sources: list[str],
                context: Tensor | None = None) -> Path:
    """Write shard ``k`` atomically (``*.tmp`` then rename)."""
    tensors = {LATENTS: latents.contiguous()}
    if context is not None:
        tensors[CONTEXT] = context.contiguous()
    final = folder / shard_name(k)
    tmp = final.with_name(final.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"prompts": json.dumps(prompts),
                                           "sources": json.dumps(sources)})
    os.replace(tmp, final)
    return final


def write_empty_context(folder: Path, context: Tensor) -> str:
    """Store the empty prompt's states ``[1, L, D]`` (atomically); returns the file's name."""
    final = folder / EMPTY_FILE
    tmp = final.with_name(final.name + ".tmp")
    save_file({CONTEXT: context.contiguous()}, str(tmp))
    os.replace(tmp, final)
    return EMPTY_FILE


def write_index(folder: Path, counts: list[int], info: dict[str, Any]) -> None:
    record = {"format": SHARDS_FORMAT, "shards": [{"file": shard_name(k), "count": n}
                                                  for k, n in enumerate(counts)], **info}
    tmp = folder / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / INDEX_FILE)


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(
            f"{folder} is not a latent shard folder (cannot read {INDEX_FILE}: {err})"
        ) from err
    if index.get("format") != SHARDS_FORMAT or not index.get("shards"):
        raise InputError(f"{path} has format {index.get('format')!r} and "
                         f"{len(index.get('shards') or [])}"
                         f" shards; expected {SHARDS_FORMAT!r} with at least one shard (mag data "
                         "encode)")
    return index


class LatentShardSource:
    """Streams latent clips from a shard folder (the ``batch`` interface of the world clips).

    Args:
        clip_frames: latent frames per clip (the first ``clip_frames`` of each stored clip).
        micro_batch, grad_accum: the recipe's micro-batch size and accumulation, which number the
            run's samples ``n = (step * grad_accum + micro) * micro_batch + index``.
    """

    def __init__(self, folder: str | Path, clip_frames: int, seed: int, micro_batch: int,
                 grad_accum: int) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.files = [self.folder / s["file"] for s in index["shards"]]
        self.starts = [0]
        for shard in index["shards"]:
            self.starts.append(self.starts[-1] + int(shard["count"]))
        self.total = self.starts[-1]
        if int(index["frames"]) < clip_frames:
            raise InputError(f"{self.folder} holds {index['frames']}-frame clips, fewer than "
                             "data.clip_frames"
                             f" = {clip_frames}")
        self.clip_frames, self.seed = clip_frames, seed
        self.text_encoder = str(index.get("text_encoder", "none"))
        empty = index.get("empty_context")
        self.empty_file = self.folder / empty if empty else None
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self._orders: dict[int, Tensor] = {}

    @property
    def has_context(self) -> bool:
        """Whether the shards carry text-encoder states (and the empty prompt's)."""
        return self.text_encoder != "none" and self.empty_file is not None

    def empty_context(self) -> Tensor:
        """The stored empty prompt's states ``[1, L, D]`` (float32)."""
        if self.empty_file is None:
            raise InputError(f"{self.folder} stores no empty-prompt context (encode it again with "
                             "--text-encoder)")
        try:
            with safe_open(str(self.empty_file), framework="pt") as f:
                return f.get_tensor(CONTEXT).float()
        except (SafetensorError, OSError) as err:
            raise InputError(f"cannot read {self.empty_file}: {err}") from err

    def _permutation(self, epoch: int) -> Tensor:
        """The row order of ``epoch`` (the last two are kept: a batch may straddle an epoch
        boundary)."""
        if epoch not in self._orders:
            state = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(state))
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = torch.randperm(self.total, generator=gen)
        return self._orders[epoch]

    def row(self, step: int, micro: int, index: int) -> int:
        """The clip (row over all shards) of sample ``index`` of micro-batch ``micro`` of
        ``step``."""
        n = (step * self.grad_accum + micro) * self.micro_batch + index
        return int(self._permutation(n // self.total)[n % self.total])

    def read(self, row: int) -> tuple[Tensor, str, Tensor | None]:
        """Latents ``[F, C, h, w]``, prompt and (if stored) context of one row."""
        k = next(k for k in range(len(self.files)) if row < self.starts[k + 1])
        local = row - self.starts[k]
        try:
            with safe_open(str(self.files[k]), framework="pt") as f:
                latents = f.get_slice(LATENTS)[local:local + 1][0, :self.clip_frames]
                context = f.get_slice(CONTEXT)[local:local + 1][0] if CONTEXT in f.keys() else None
                prompt = json.loads((f.metadata() or {})["prompts"])[local]
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise InputError(f"cannot read row {local} of shard {self.files[k]}: {err}") from err
        return latents.float(), prompt, context

    def batch(self, step: int, micro: int, indices: range) -> LatentBatch:
        rows = [self.read(self.row(step, micro, i)) for i in indices]
        video = torch.stack([r[0] for r in rows])
        zeros = torch.zeros(video.shape[:2])
        contexts = [r[2] for r in rows]
        context = torch.stack(contexts) if all(c is not None for c in contexts) else None
        return LatentBatch(video, zeros, zeros.clone(), [r[1] for r in rows], context)
