"""umT5 encoder (transformers ``UMT5EncoderModel``): Wan2.1's text encoder, google/umt5-xxl, 4096-d,
prompts padded to 512 tokens.

Weights come from local files only: the original Wan2.1 folder (``models_t5_umt5-xxl-enc-bf16.pth``
+ ``google/umt5-xxl/``, :mod:`mag.text.umt5_wan`) or that ``.pth`` itself, a diffusers pipeline root
(``text_encoder/`` + ``tokenizer/``), or one folder holding both a transformers encoder and its
tokenizer; a separate ``tokenizer_path`` may be given. Prompts are cleaned as Wan does
(:func:`clean_prompt`). The empty prompt "" tokenises to the end-of-sequence token alone, so its
embedding is that row then zeros.

``tiny_random`` pairs a small random UMT5 with any tokenizer folder (tests use MiniLM's, the only
one available offline): that is only good for shape and plumbing tests, never for meaningful
embeddings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mag.errors import CheckpointError, ConfigError
from mag.text.base import HFTokenEncoder, TextEncoder, check_prompts, clean_prompt
from mag.text.umt5_wan import WAN_T5_FILE, WAN_T5_TOKENIZER, load_wan_t5

__all__ = ["UMT5Encoder", "UMT5_DIM", "UMT5_MAX_TOKENS", "UMT5_MODE", "TINY_UMT5_CONFIG"]

UMT5_DIM = 4096
"""d_model of umt5-xxl, Wan2.1's ``text_dim``."""
UMT5_MAX_TOKENS = 512
"""Wan2.1's ``text_len``."""
UMT5_MODE = "tokens"
"""umT5's only output mode: per-token hidden states (what the DiT cross-attends to)."""
TINY_UMT5_CONFIG: dict[str, Any] = {
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
}
"""A random UMT5 encoder small enough for CPU tests."""
_MODEL_TYPE = "umt5"
_HASH_CHARS = 16


class UMT5Encoder(TextEncoder):
    """prompts -> [B, max_tokens, d_model] last hidden states, zero rows after each prompt's
    tokens."""

    name = "umt5"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_tokens: int = UMT5_MAX_TOKENS,
                 source: str = "") -> None:
        vocab = int(model.config.vocab_size)
        if len(tokenizer) > vocab:
            raise CheckpointError(
                f"tokenizer has {len(tokenizer)} tokens but the umT5 embedding table has {vocab} "
                "rows;"
                " pass the tokenizer that belongs to these weights (google/umt5-xxl for Wan)"
            )
        if max_tokens <= 0:
            raise ConfigError(f"umt5 max_tokens must be positive, got {max_tokens}")
        self._hf = HFTokenEncoder(tokenizer, model)
        self.text_dim = int(model.config.d_model)
        self.max_tokens = max_tokens
        self.fingerprint = f"umt5:{max_tokens}:{source}"

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer_path: str | Path | None = None,
                        max_tokens: int = UMT5_MAX_TOKENS,
                        dtype: torch.dtype = torch.float32) -> UMT5Encoder:
        """Load encoder and tokenizer from local folders (see the module docstring), never the
        network."""
        from transformers import AutoConfig, UMT5EncoderModel

        path = Path(path)
        original = path / WAN_T5_FILE if path.is_dir() else path
        if original.is_file() and original.suffix in (".pth", ".pt"):
            folder = original.parent
            tokenizer_dir = (
                Path(tokenizer_path) if tokenizer_path is not None else folder / WAN_T5_TOKENIZER
            )
            model = load_wan_t5(original, dtype)
            return cls(model, _load_tokenizer(tokenizer_dir), max_tokens=max_tokens,
                       source=str(original.resolve()))
        if not path.is_dir():
            raise CheckpointError(f"umT5 weights not found at {path}; pass the Wan2.1 folder (with"
                                  f" {WAN_T5_FILE} and {WAN_T5_TOKENIZER}/), a diffusers Wan "
                                  "pipeline root,"
                                  " or a folder with a UMT5 encoder's config.json and weights")
        model_dir = (
            path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        )
        if tokenizer_path is None:
            tokenizer_path = path / "tokenizer" if (path / "tokenizer").is_dir() else model_dir
        tokenizer_path = Path(tokenizer_path)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"no config.json in {model_dir} (nor in "
                                  f"{path / 'text_encoder'}); it is not"
                                  " a transformers UMT5 encoder folder")
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"unreadable config in {model_dir}: {err}") from err
        if config.model_type != _MODEL_TYPE:
            found = config.model_type
            raise CheckpointError(f"{model_dir} holds a {found!r} model, expected {_MODEL_TYPE!r}")
        try:
            model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"could not load the umT5 encoder from {model_dir}: {err}"
            ) from err
        return cls(model, _load_tokenizer(tokenizer_path), max_tokens=max_tokens,
                   source=str(model_dir.resolve()))

    @classmethod
    def tiny_random(cls, tokenizer_path: str | Path, seed: int = 0, max_tokens: int = 16,
                    **overrides: Any) -> UMT5Encoder:
        """A seeded random tiny UMT5 (``TINY_UMT5_CONFIG``) sized to the tokenizer's vocabulary.

        For shape tests only: the tokenizer is whatever folder is given (tests use MiniLM's).
        """
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointError(f"no usable tokenizer in {tokenizer_path}: {err}") from err
        settings = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                    **TINY_UMT5_CONFIG, **overrides}
        config = UMT5Config(**settings)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config)
        config_hash = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:_HASH_CHARS]
        return cls(model, tokenizer, max_tokens=max_tokens,
                   source=f"random-seed{seed}-{config_hash}")

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> UMT5Encoder:
        self._hf.model.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, folder: str | Path) -> None:
        """Write encoder and tokenizer into one folder that ``from_pretrained`` reads back."""
        self._hf.model.save_pretrained(folder)
        self._hf.tokenizer.save_pretrained(folder)

    def parameter_bytes(self) -> int:
        return self._hf.parameter_bytes()

    def encode_with_lengths(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> (embeddings [B, max_tokens, d_model], valid rows per prompt [B])."""
        prompts = [clean_prompt(p) for p in check_prompts(prompts)]
        hidden, mask = self._hf.hidden_states(prompts, self.max_tokens)
        return HFTokenEncoder.pad_tokens(hidden, mask, self.max_tokens), mask.sum(1).cpu()


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"no usable tokenizer in {folder}: {err}; pass tokenizer_path= a folder with the"
            f" google/umt5-xxl tokenizer files (in a Wan2.1 folder: {WAN_T5_TOKENIZER}/)"
        ) from err
