"""Text encoders behind one interface: ``minilm`` (tiny preset, offline 384-d) and ``umt5`` (Wan,
4096-d), plus a prompt-embedding cache. ``get_text_encoder(name, **kw)`` is the one way in.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mag.config import build_registered
from mag.errors import ConfigError
from mag.text.base import TextEncoder
from mag.text.cache import PromptEmbeddingCache
from mag.text.minilm import MiniLMEncoder, minilm_path
from mag.text.table import PROMPT_TABLE_ENV, PromptTableEncoder, write_prompt_table
from mag.text.umt5 import UMT5_MAX_TOKENS, UMT5_MODE, UMT5Encoder

__all__ = ["PROMPT_TABLE_ENV", "TEXT_ENCODERS", "MiniLMEncoder", "PromptEmbeddingCache",
           "PromptTableEncoder",
           "TextEncoder", "UMT5Encoder", "get_text_encoder", "minilm_path", "prompt_cache",
           "write_prompt_table"]


def _make_umt5(path: str | Path | None = None, tokenizer_path: str | Path | None = None,
               max_tokens: int = UMT5_MAX_TOKENS, tiny: bool = False, seed: int = 0,
               mode: str = UMT5_MODE) -> TextEncoder:
    """``path`` -> real weights; ``tiny=True`` -> random tiny UMT5 on ``tokenizer_path`` (or
    MiniLM's).

    ``mode`` exists so callers can pass every encoder the same arguments: umT5 has per-token outputs
    only.
    """
    if mode != UMT5_MODE:
        raise ConfigError(f"text encoder 'umt5' has only mode {UMT5_MODE!r}, got {mode!r}")
    if path is not None:
        return UMT5Encoder.from_pretrained(path, tokenizer_path=tokenizer_path,
                                           max_tokens=max_tokens)
    if tiny:
        return UMT5Encoder.tiny_random(tokenizer_path or minilm_path(), seed=seed,
                                       max_tokens=max_tokens)
    raise ConfigError(
        "text encoder 'umt5' needs weights: path=<Wan2.1 folder, its "
        "models_t5_umt5-xxl-enc-bf16.pth,"
        " a Wan diffusers folder or a UMT5 encoder folder>"
        " (tokenizer_path=<umt5-xxl tokenizer folder> if separate), or tiny=True for random test "
        "weights"
    )


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {"minilm": MiniLMEncoder, "umt5": _make_umt5}


def get_text_encoder(name: str, **kwargs: Any) -> TextEncoder:
    """Build a text encoder by registry name (``minilm``: mode, max_tokens; ``umt5``: see
    ``_make_umt5``).

    With ``MAG_PROMPT_TABLE=FILE`` set, the prompt table in FILE (``mag text table``) stands in for
    the encoder it was built from, so machines without the encoder's weights run on known prompts.
    """
    table = os.environ.get(PROMPT_TABLE_ENV)
    if table:
        return PromptTableEncoder(table).check_matches(name, mode=kwargs.get("mode"),
                                                       max_tokens=kwargs.get("max_tokens"))
    return build_registered("text encoder", TEXT_ENCODERS, name, **kwargs)


@functools.lru_cache(maxsize=4)
def prompt_cache(encoder_name: str, mode: str, path: str = "") -> PromptEmbeddingCache:
    """One encoder + embedding cache per process: loading MiniLM takes seconds, prompts repeat.
    ``mode`` applies to MiniLM; ``path`` names UMT5's weights (a recipe's
    ``data.text_encoder_path``)."""
    if encoder_name == "umt5":
        return PromptEmbeddingCache(get_text_encoder(encoder_name, path=path or None))
    return PromptEmbeddingCache(get_text_encoder(encoder_name, mode=mode))
