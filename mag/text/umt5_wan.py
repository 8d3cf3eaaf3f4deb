"""Wan2.1's original text-encoder file (``models_t5_umt5-xxl-enc-bf16.pth``) as a transformers UMT5
encoder.

The original release stores Wan's own T5 encoder class: ``token_embedding``, per block ``norm1``,
``attn.{q,k,v,o}``, a per-block relative position table ``pos_embedding.embedding`` (umT5 keeps one
per layer), ``norm2`` and a gated-GELU feed-forward ``ffn.{gate.0,fc1,fc2}``, then ``norm``. Every
tensor maps one-to-one onto ``UMT5EncoderModel`` (same shapes; ``gate.0`` is ``wi_0``, the GELU-tanh
branch). The architecture is read from the shapes; what they cannot say is Wan's fixed setting
(relative-position max distance 128). The tokenizer is the ``google/umt5-xxl`` folder next to the
file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mag.errors import CheckpointError

__all__ = ["WAN_T5_FILE", "WAN_T5_TOKENIZER", "hf_to_wan_t5", "load_wan_t5", "wan_t5_config",
           "wan_t5_to_hf"]

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
"""The encoder file's name in a Wan2.1 folder."""
WAN_T5_TOKENIZER = "google/umt5-xxl"
"""The tokenizer folder's path in a Wan2.1 folder."""
WAN_T5_MAX_DISTANCE = 128
"""Wan's relative-position max distance (a constructor default there, not stored in the file)."""
WAN_T5_EPS = 1e-6

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_IN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_KEYS_SHOWN = 5


def wan_t5_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan T5 encoder state dict -> ``UMT5EncoderModel`` names; an unknown key is an error, never
    dropped."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match and match.group(2) in _IN_BLOCK:
            out[f"encoder.block.{match.group(1)}.{_IN_BLOCK[match.group(2)]}"] = value
        elif key in _TOP:
            out[_TOP[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys are not Wan T5 encoder keys (e.g. {unknown[:_KEYS_SHOWN]}); "
            "expected the"
            f" encoder-only {WAN_T5_FILE} layout (token_embedding, blocks.N.attn/ffn/norm1/norm2, "
            "norm)"
        )
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def hf_to_wan_t5(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``UMT5EncoderModel`` state dict -> the original Wan layout (writes small files in Wan's
    format)."""
    top = {hf: wan for wan, hf in _TOP.items()}
    in_block = {hf: wan for wan, hf in _IN_BLOCK.items()}
    out = {}
    for key, value in state.items():
        match = re.match(r"^encoder\.block\.(\d+)\.(.+)$", key)
        if match and match.group(2) in in_block:
            out[f"blocks.{match.group(1)}.{in_block[match.group(2)]}"] = value
        elif key in top:
            out[top[key]] = value
        elif key != "encoder.embed_tokens.weight":  # tied to shared.weight
            raise CheckpointError(f"{key} has no place in the Wan T5 encoder layout")
    return out


def wan_t5_config(state: Mapping[str, Tensor]) -> dict[str, object]:
    """``UMT5Config`` settings read from the shapes of a Wan T5 encoder state dict."""
    try:
        vocab, dim = state["token_embedding.weight"].shape
        layers = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, state) if m)
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        dim_attn = state["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as err:
        found = list(state)[:_KEYS_SHOWN]
        raise CheckpointError(
            f"not a Wan T5 encoder state dict (found keys {found}); expected "
            "token_embedding.weight and"
            " blocks.N.pos_embedding / attn / ffn, as in " + WAN_T5_FILE
        ) from err
    return {
        "vocab_size": int(vocab), "d_model": int(dim), "d_kv": int(dim_attn) // int(heads),
        "d_ff": int(dim_ffn),
        "num_layers": layers, "num_heads": int(heads),
        "relative_attention_num_buckets": int(buckets),
        "relative_attention_max_distance": WAN_T5_MAX_DISTANCE, "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": WAN_T5_EPS, "is_encoder_decoder": False, "use_cache": False,
        "tie_word_embeddings": False,
    }


def load_wan_t5(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A ``UMT5EncoderModel`` (eval mode, frozen) holding the weights of the original Wan file at
    ``path``."""
    from transformers import (  # lazy: transformers takes seconds to import
        UMT5Config,
        UMT5EncoderModel,
    )

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for a damaged or non-weights-only file
        raise CheckpointError(f"cannot read the Wan T5 encoder file {path} (corrupt, truncated, "
                              "or not a"
                              f" weights-only file): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    config = UMT5Config(**wan_t5_config(state))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    hf = wan_t5_to_hf(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(hf))
    wrong = [f"{k}: {list(hf[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
             if k in hf and hf[k].shape != v.shape]
    if missing or wrong:
        raise CheckpointError(f"{path} does not fit a UMT5 encoder: missing "
                              f"{missing[:_KEYS_SHOWN]},"
                              f" wrong shapes {wrong[:_KEYS_SHOWN]}")
    model.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)
