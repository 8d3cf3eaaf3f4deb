"""The text-encoder interface: prompts -> per-token embeddings the DiT cross-attends to.

Output convention (Wan's): ``[B, max_tokens, text_dim]``, the encoder's last hidden states at the
real tokens (special tokens included) followed by rows of exact zeros up to ``max_tokens``. Zero
rows, not the encoder's outputs at padding positions, are what Wan's T5 wrapper and diffusers'
``WanPipeline`` feed the DiT, so the padding carries no information. Prompts longer than
``max_tokens`` tokens are truncated.
"""

from __future__ import annotations

import html
import re
from abc import ABC, abstractmethod
from typing import Any

import ftfy
import torch
from torch import Tensor

from mag.errors import InputError

__all__ = ["TextEncoder", "HFTokenEncoder", "check_prompts", "clean_prompt"]


def check_prompts(prompts: Any) -> list[str]:
    """Accept a non-empty list/tuple of strings; a bare string is a common slip, so say so."""
    if isinstance(prompts, str):
        raise InputError(f"text encoders take a list of prompts, got the str {prompts[:40]!r}; "
                         "use [prompt]")
    if (
        not isinstance(prompts, list | tuple)
        or not prompts
        or not all(isinstance(p, str) for p in prompts)
    ):
        found = f"{type(prompts).__name__} {prompts!r:.80}"
        raise InputError(f"text encoders take a non-empty list of str, got {found}")
    return list(prompts)


def clean_prompt(text: str) -> str:
    """Wan's prompt clean-up (its tokenizer's ``clean="whitespace"``): ``ftfy.fix_text``, unescape
    HTML entities twice, strip, collapse whitespace runs to one space, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder(ABC):
    """prompts (list[str]) -> embeddings [B, L, text_dim].

    Attributes:
        name: registry name.
        text_dim: width of one token embedding.
        max_tokens: L, the padded length of the output.
        fingerprint: identifies the weights and settings, so caches never mix two encoders' outputs.
    """

    name: str
    text_dim: int
    max_tokens: int
    fingerprint: str

    def encode(self, prompts: list[str]) -> Tensor:
        """prompts -> [B, max_tokens, text_dim], zero rows after each prompt's tokens."""
        return self.encode_with_lengths(prompts)[0]

    @abstractmethod
    def encode_with_lengths(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> (embeddings [B, max_tokens, text_dim], valid rows per prompt [B] int64 on
        CPU)."""

    @abstractmethod
    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the weights; returns self."""

    def parameter_bytes(self) -> int:
        """Bytes of the encoder's weights where they live (0 for encoders without a network)."""
        return 0


class HFTokenEncoder:
    """A transformers tokenizer + encoder pair run the Wan way (shared by ``minilm`` and
    ``umt5``)."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        # real tokens first, then padding: what pad_tokens assumes
        self.tokenizer.padding_side = "right"
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def hidden_states(self, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """prompts -> (last hidden states [B, n, D] with n the longest prompt, attention mask [B,
        n]).

        Padding to the batch's longest prompt (not to ``max_length``) gives the same values at real
        tokens, because padded keys are masked out, and costs less.
        """
        batch = self.tokenizer(prompts, padding="longest", truncation=True, max_length=max_length,
                               add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    @staticmethod
    def pad_tokens(hidden: Tensor, mask: Tensor, max_tokens: int) -> Tensor:
        """[B, n, D] states + mask [B, n] -> [B, max_tokens, D], zeros at padding and beyond n."""
        out = hidden.new_zeros(hidden.shape[0], max_tokens, hidden.shape[2])
        n = min(hidden.shape[1], max_tokens)
        out[:, :n] = hidden[:, :n] * mask[:, :n, None].to(hidden.dtype)
        return out
