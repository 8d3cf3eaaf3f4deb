"""Prompt tables: a text encoder's outputs for a fixed set of prompts, saved to one safetensors
file.

A machine that runs on a known prompt set reads the table (``MAG_PROMPT_TABLE=FILE``) instead of the
text encoder. The table keeps the source encoder's name, fingerprint and settings, so its entries
count as that encoder's own and a table of another encoder or mode is refused; a prompt outside the
table is an error, never a silent zero embedding. File layout: docs/codecs-and-text.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mag.errors import CheckpointError, ConfigError, InputError
from mag.io.files import atomic_path
from mag.text.base import TextEncoder, check_prompts

__all__ = ["PROMPT_TABLE_ENV", "PromptTableEncoder", "encoder_settings", "write_prompt_table"]

PROMPT_TABLE_ENV = "MAG_PROMPT_TABLE"
"""Environment variable naming a prompt table that replaces the text encoder it was built from."""
ENCODE_BATCH = 64
"""Prompts encoded per call while building a table (bounds the encoder's activation memory)."""


def encoder_settings(encoder: TextEncoder) -> dict[str, object]:
    """The settings a table must match to stand in for ``encoder`` (mode where the encoder has
    one)."""
    return {"mode": getattr(encoder, "mode", None), "max_tokens": encoder.max_tokens}


def write_prompt_table(encoder: TextEncoder, prompts: Sequence[str], path: str | Path) -> Path:
    """Encode ``prompts`` (duplicates dropped, order kept) and write the table atomically to
    ``path``."""
    unique = list(dict.fromkeys(check_prompts(list(prompts))))
    embeddings, lengths = [], []
    for start in range(0, len(unique), ENCODE_BATCH):
        emb, n = encoder.encode_with_lengths(unique[start:start + ENCODE_BATCH])
        embeddings.append(emb.detach().to("cpu", torch.float32))
        lengths.append(n.to("cpu", torch.long))
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write the prompt table {path}: folder {path.parent} does not "
                         "exist")
    metadata = {"name": encoder.name, "fingerprint": encoder.fingerprint,
                "text_dim": str(encoder.text_dim),
                "settings": json.dumps(encoder_settings(encoder)), "prompts": json.dumps(unique)}
    with atomic_path(path) as tmp:
        save_file({"embeddings": torch.cat(embeddings).contiguous(), "lengths": torch.cat(lengths)},
                  str(tmp), metadata=metadata)
    return path


class PromptTableEncoder(TextEncoder):
    """A :class:`TextEncoder` that looks prompts up in a table written by
    :func:`write_prompt_table`."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"prompt table {path} does not exist; build it with"
                                  f" `mag text table -o {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                self._embeddings = f.get_tensor("embeddings")
                self._lengths = f.get_tensor("lengths")
            prompts = json.loads(meta["prompts"])
            self.name = meta["name"]
            self.fingerprint = meta["fingerprint"]
            self.text_dim = int(meta["text_dim"])
            self.settings = json.loads(meta["settings"])
        except Exception as err:  # safetensors and json raise several types for damaged files
            raise CheckpointError(f"{path} is not a readable prompt table ({err}); rebuild it with"
                                  " `mag text table`") from err
        rows = len(prompts)
        if (
            self._embeddings.ndim != 3
            or not self._embeddings.shape[0] == self._lengths.shape[0] == rows
        ):
            raise CheckpointError(f"prompt table {path} is inconsistent: {len(prompts)} prompts, "
                                  "embeddings"
                                  f" {tuple(self._embeddings.shape)}; rebuild it with `mag text "
                                  "table`")
        self.path = path
        self.max_tokens = int(self._embeddings.shape[1])
        self._index = {prompt: i for i, prompt in enumerate(prompts)}

    def check_matches(self, name: str, **settings: object) -> PromptTableEncoder:
        """Refuse to stand in for an encoder other than the table's source (name, mode,
        max_tokens)."""
        wanted = {k: v for k, v in settings.items() if k in self.settings and v is not None}
        differ = {k: (v, self.settings[k]) for k, v in wanted.items() if self.settings[k] != v}
        if name != self.name or differ:
            found = ", ".join(f"{k}={t!r} (asked {a!r})" for k, (a, t) in differ.items())
            raise ConfigError(f"prompt table {self.path} was built with text encoder {self.name!r}"
                              f" {self.settings}, not {name!r} {found}; rebuild it or unset"
                              f" {PROMPT_TABLE_ENV}")
        return self

    def encode_with_lengths(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        prompts = check_prompts(prompts)
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise InputError(f"prompt {missing[0]!r} is not in the prompt table {self.path}"
                             f" ({len(self._index)} prompts); add it with `mag text table "
                             "--prompt ...` or"
                             f" unset {PROMPT_TABLE_ENV} to use the text encoder")
        rows = torch.tensor([self._index[p] for p in prompts], dtype=torch.long)
        return self._embeddings[rows].clone(), self._lengths[rows].clone()

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TextEncoder:
        """Tables stay on the CPU (callers move the embeddings they get)."""
        return self
