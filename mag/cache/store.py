"""The host side of the ``archive`` policy: compressed frames evicted from the GPU ring.

Frames are appended once (one per block) into fixed-size chunks of pinned host memory; past
``host_bytes`` the oldest full chunks are written to a spill folder (atomic writes) and read back
through memory maps. A frame's entry is immutable: its K/V as stored (RoPE at ``stored_position``),
its stream frame index, its camera (or None) and a key descriptor for retrieval without a camera.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mag.cache.kv import KV_TENSORS
from mag.errors import ConfigError
from mag.io.files import atomic_path

# Frames per host chunk: the unit of spilling to disk.
CHUNK_FRAMES = 64


class FrameArchive:
    """Append-only store of compressed frames' K/V ``[2, layers, B, heads, tokens, head_dim]``.

    Args:
        frame_shape: ``(layers, B, heads, tokens, head_dim)`` of one frame's K (and V).
        dtype: storage dtype (the cache's). pin: pin host chunks (CUDA caches: async copies).
        host_bytes: host memory the chunks may hold before the oldest are spilled to disk.
        spill_dir: parent folder of the spill folder (default: the system's temporary folder).
        chunk_frames: frames per host chunk (the unit of spilling).
    """

    def __init__(self, frame_shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool,
                 host_bytes: int, spill_dir: str | Path | None = None,
                 chunk_frames: int = CHUNK_FRAMES) -> None:
        if host_bytes < 0:
            raise ConfigError(f"archive host_bytes must be >= 0, got {host_bytes}")
        if chunk_frames <= 0:
            raise ConfigError(f"archive chunk_frames must be > 0, got {chunk_frames}")
        self.frame_shape = frame_shape
        self.dtype = dtype
        self.pin = pin
        self.host_bytes = host_bytes
        self.chunk_frames = chunk_frames
        self.spill_parent = None if spill_dir is None else Path(spill_dir)
        self.frame_bytes = KV_TENSORS * math.prod(frame_shape) * dtype.itemsize
        self._spill_dir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self.clear()

    def clear(self) -> None:
        """Forget every frame and remove the spill folder."""
        self._chunks: list[Tensor | np.memmap] = []
        self._spilled = 0  # chunks [0, _spilled) live on disk
        self.stored_positions: list[int] = []
        self.frame_indices: list[int] = []
        self.cameras = _Rows()  # [N, B] camera of each frame (NaN: none)
        self.descriptors = _Rows()  # [N, B, D] content descriptor (frames without a camera)
        self._copied: list[torch.cuda.Event] = []  # per frame: its async host copy is done
        if self._finalizer is not None:
            self._finalizer()
        self._spill_dir, self._finalizer = None, None

    def __len__(self) -> int:
        return len(self.frame_indices)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """K/V bytes of every archived frame (host and disk)."""
        return len(self) * self.frame_bytes

    @property
    def disk_bytes(self) -> int:
        return self._spilled * self.chunk_frames * self.frame_bytes

    @property
    def host_bytes_used(self) -> int:
        """Bytes of the host chunks allocated (a partly filled chunk counts whole)."""
        return (len(self._chunks) - self._spilled) * self.chunk_frames * self.frame_bytes

    # -- write ---------------------------------------------------------------------------------

    def append(self, k: Tensor, v: Tensor, *, stored_position: int, frame_index: int,
               camera: np.ndarray | None, descriptor: np.ndarray | None) -> int:
        """Archive one frame's ``k, v: frame_shape`` (device tensors); returns its id."""
        index = len(self)
        chunk, row = divmod(index, self.chunk_frames)
        if chunk == len(self._chunks):
            self._chunks.append(torch.empty((self.chunk_frames, KV_TENSORS, *self.frame_shape),
                                            dtype=self.dtype, pin_memory=self.pin))
            self._spill_full_chunks()
        store = self._chunks[chunk]
        store[row, 0].copy_(k, non_blocking=self.pin)
        store[row, 1].copy_(v, non_blocking=self.pin)
        if self.pin:
            event = torch.cuda.Event()
            event.record()
            self._copied.append(event)
        self.stored_positions.append(stored_position)
        self.frame_indices.append(frame_index)
        self.cameras.append(np.full(self.frame_shape[1], np.nan) if camera is None else camera)
        if descriptor is not None:
            self.descriptors.append(descriptor)
        return index

    def _spill_full_chunks(self) -> None:
        """Write the oldest full host chunks to disk while the host holds more than its budget."""
        while self.host_bytes_used > self.host_bytes and self._spilled < len(self._chunks) - 1:
            chunk = self._chunks[self._spilled]
            assert isinstance(chunk, Tensor)
            if self.pin:  # the chunk's async copies must have landed
                self._copied[(self._spilled + 1) * self.chunk_frames - 1].synchronize()
            raw = chunk.view(torch.uint8).numpy()
            path = self._spill_folder() / f"chunk_{self._spilled:06d}.bin"
            with atomic_path(path, suffixes=(".bin",), what="archive spill") as tmp:
                raw.tofile(tmp)
            self._chunks[self._spilled] = np.memmap(path, dtype=np.uint8, mode="r",
                                                    shape=raw.shape)
            self._spilled += 1

    def _spill_folder(self) -> Path:
        if self._spill_dir is None:
            if self.spill_parent is not None:
                self.spill_parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="mag-archive-",
                                                    dir=self.spill_parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        return self._spill_dir

    # -- read ----------------------------------------------------------------------------------

    def frame(self, index: int, sample: int) -> Tensor:
        """``[2, layers, heads, tokens, head_dim]`` K/V of archived frame ``index`` for one sample
        (a host tensor; from disk when spilled)."""
        chunk, row = divmod(index, self.chunk_frames)
        store = self._chunks[chunk]
        if isinstance(store, Tensor):
            if self.pin:
                self._copied[index].synchronize()
            return store[row, :, :, sample]
        raw = torch.from_numpy(np.array(store[row]))
        return raw.view(self.dtype).view(KV_TENSORS, *self.frame_shape)[:, :, sample]


class _Rows:
    """Rows appended one at a time into a doubling array, read as one contiguous ``[n, ...]``
    view (per-block retrieval scores every archived frame without re-stacking them)."""

    def __init__(self) -> None:
        self._data: np.ndarray | None = None
        self.count = 0

    def append(self, row: np.ndarray) -> None:
        if self._data is None:
            self._data = np.empty((1, *row.shape), dtype=row.dtype)
        elif self.count == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self.count] = row
        self.count += 1

    def view(self) -> np.ndarray:
        return np.empty(0) if self._data is None else self._data[:self.count]


__all__ = ["CHUNK_FRAMES", "FrameArchive"]
