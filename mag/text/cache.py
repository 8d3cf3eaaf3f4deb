"""Prompt-embedding cache: encode each distinct prompt once per encoder, keep it in memory (LRU)
and, optionally, on disk as safetensors so later runs skip the text encoder.

Keys are (encoder fingerprint, prompt), so two encoders never share entries; ``get`` pads an entry's
real token rows back to ``max_tokens`` and so reproduces ``encoder.encode`` exactly. Disk writes are
atomic; an unreadable or mismatching file is a warned miss, re-encoded and overwritten (the cache
holds derived data). The on-disk layout: docs/codecs-and-text.md.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mag.errors import ConfigError
from mag.io.files import atomic_path
from mag.text.base import TextEncoder, check_prompts

__all__ = ["PromptEmbeddingCache"]

DEFAULT_MAX_ENTRIES = 1024
"""In-memory entries kept before the least recently used is dropped."""
_TENSOR_KEY = "embedding"
_FOLDER_HASH_CHARS = 16
_FILE_HASH_CHARS = 32
_SUFFIX = ".safetensors"


def _sha(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


class PromptEmbeddingCache:
    """``get(prompts) -> [B, max_tokens, text_dim]`` through ``encoder``, encoding only the misses.

    Attributes:
        hits / misses: prompts served without encoding (from memory, disk, or a duplicate in the
        same call)
            / prompts sent to the encoder.
    """

    def __init__(self, encoder: TextEncoder, max_entries: int = DEFAULT_MAX_ENTRIES,
                 cache_dir: str | Path | None = None) -> None:
        if max_entries <= 0:
            raise ConfigError("PromptEmbeddingCache max_entries must be positive, got "
                              f"{max_entries}")
        self.encoder = encoder
        self.max_entries = max_entries
        self._memory: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._dir = Path(cache_dir) / _sha(encoder.fingerprint,
                                           _FOLDER_HASH_CHARS) if cache_dir else None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, prompts: list[str], device: torch.device | str | None = None) -> Tensor:
        """prompts -> embeddings [B, max_tokens, text_dim] (on ``device``, default CPU)."""
        prompts = check_prompts(prompts)
        found: dict[str, Tensor] = {}
        for prompt in dict.fromkeys(prompts):  # unique, in order
            entry = self._lookup(prompt)
            if entry is not None:
                found[prompt] = entry
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            embeddings, lengths = self.encoder.encode_with_lengths(missing)
            for prompt, embedding, n in zip(missing, embeddings, lengths.tolist(), strict=True):
                entry = embedding[:n].detach().to("cpu", copy=True)
                self._remember(prompt, entry)
                self._write(prompt, entry)
                found[prompt] = entry
        first = found[prompts[0]]
        out = first.new_zeros(len(prompts), self.encoder.max_tokens, first.shape[-1])
        for i, prompt in enumerate(prompts):
            entry = found[prompt]
            out[i, : entry.shape[0]] = entry
        return out.to(device) if device is not None else out

    def clear_memory(self) -> None:
        """Drop the in-memory entries (the disk store stays)."""
        self._memory.clear()

    # -- memory --------------------------------------------------------------------------------

    def _key(self, prompt: str) -> tuple[str, str]:
        return (self.encoder.fingerprint, prompt)

    def _remember(self, prompt: str, entry: Tensor) -> None:
        key = self._key(prompt)
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def _lookup(self, prompt: str) -> Tensor | None:
        key = self._key(prompt)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        entry = self._read(prompt)
        if entry is not None:
            self._remember(prompt, entry)
        return entry

    # -- disk ----------------------------------------------------------------------------------

    def _file(self, prompt: str) -> Path | None:
        return (
            self._dir / f"{_sha(prompt, _FILE_HASH_CHARS)}{_SUFFIX}"
            if self._dir is not None
            else None
        )

    def _read(self, prompt: str) -> Tensor | None:
        path = self._file(prompt)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                entry = f.get_tensor(_TENSOR_KEY)
            if meta.get("prompt") != prompt or meta.get("fingerprint") != self.encoder.fingerprint:
                raise ValueError("its metadata names another prompt or encoder")
            enc = self.encoder
            if entry.ndim != 2 or entry.shape[0] > enc.max_tokens or entry.shape[1] != enc.text_dim:
                raise ValueError(f"embedding shape {tuple(entry.shape)} does not fit this encoder")
        except Exception as err:  # safetensors raises several types for damaged files
            warnings.warn(f"prompt-embedding cache file {path} is unusable ({err}); re-encoding "
                          "the prompt",
                          RuntimeWarning, stacklevel=3)
            return None
        return entry

    def _write(self, prompt: str, entry: Tensor) -> None:
        path = self._file(prompt)
        if path is None:
            return
        with atomic_path(path) as tmp:
            save_file({_TENSOR_KEY: entry.contiguous()}, str(tmp),
                      metadata={"prompt": prompt, "fingerprint": self.encoder.fingerprint})
