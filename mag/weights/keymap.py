"""Key maps between our parameter names (= original Wan2.1 names) and diffusers
``WanTransformer3DModel``.

Every tensor has the same shape in both layouts (checked against diffusers' module definitions:
the 6-way block modulation ``blocks.N.modulation [1, 6, dim]`` is diffusers'
``blocks.N.scale_shift_table [1, 6, dim]``, the head's ``head.modulation [1, 2, dim]`` is the
top-level ``scale_shift_table``). Note the two LayerNorm numberings differ: Wan's affine
cross-attention norm is ``norm3``, diffusers calls it ``norm2`` (the affine-free norms carry no
weights in either). Keys outside the Wan text-to-video architecture (image-to-video branches) have
no mapping and are reported, never silently dropped. Our optional ``action_embedding`` has no
diffusers counterpart and keeps its name in both directions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mag.errors import CheckpointError

# (ours, diffusers) name prefixes of top-level modules; exact names end without a dot.
TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("action_embedding.", "action_embedding."),
)

# (ours, diffusers) name prefixes inside ``blocks.N.``.
IN_BLOCK: tuple[tuple[str, str], ...] = (
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
)

_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.+)$")
# How many offending keys an error message lists before giving counts only.
KEYS_SHOWN = 5


def _rename(key: str, table: tuple[tuple[str, str], ...], src: int) -> str | None:
    for pair in table:
        prefix = pair[src]
        exact = not prefix.endswith(".")
        if (exact and key == prefix) or (not exact and key.startswith(prefix)):
            return pair[1 - src] + key[len(prefix):]
    return None


def _convert(state: Mapping[str, Tensor], src: int, what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        new = (_rename(match.group(2), IN_BLOCK, src) if match else _rename(key, TOP_LEVEL, src))
        if new is None:
            unknown.append(key)
            continue
        out[(match.group(1) if match else "") + new] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} {what} keys have no Wan2.1 text-to-video equivalent"
            f" (e.g. {unknown[:KEYS_SHOWN]});"
            " image-to-video and other variants are not supported"
        )
    return out


def diffusers_to_wan(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``WanTransformer3DModel`` state dict -> our (original Wan2.1) names."""
    return _convert(state, src=1, what="diffusers")


def wan_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our (original Wan2.1) state dict -> diffusers ``WanTransformer3DModel`` names."""
    return _convert(state, src=0, what="Wan")


__all__ = ["IN_BLOCK", "KEYS_SHOWN", "TOP_LEVEL", "diffusers_to_wan", "wan_to_diffusers"]
