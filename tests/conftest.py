"""Shared fixtures: a tiny DiT config and a factory for randomly initialised DiTs (fp32, seeded)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import random_dit, randomise_parameters_

from mag.config import DiTConfig
from mag.models import WanDiT

TINY_DIT = DiTConfig(in_channels=4, out_channels=4, dim=24, ffn_dim=48, num_heads=2, num_layers=2,
                     text_dim=16, freq_dim=16, patch_size=(1, 2, 2), rope_max_positions=256)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Two cores shared with other jobs: tiny models run fastest, and most predictably, on one
    intra-op thread. Session scope, so module-scoped fixtures that train or sample models get it
    too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dit_cfg() -> DiTConfig:
    return TINY_DIT


@pytest.fixture
def make_dit() -> Callable[..., WanDiT]:
    """``make_dit(**overrides)``: a tiny WanDiT whose every parameter is random (Wan's init zeroes
    the head, which would make output comparisons vacuous)."""

    def build(seed: int = 0, **overrides: Any) -> WanDiT:
        return random_dit(dataclasses.replace(TINY_DIT, **overrides), seed)

    return build


@pytest.fixture
def diffusers_twin() -> Callable[[DiTConfig], Any]:
    """``diffusers_twin(cfg)``: a diffusers ``WanTransformer3DModel`` with the same shapes and EVERY
    parameter random (diffusers' init sets qk-norm weights to 1 and the cross-attention LayerNorm to
    1 / 0, which would hide a norm mapped to the wrong place)."""
    from diffusers import WanTransformer3DModel

    def build(cfg: DiTConfig) -> WanTransformer3DModel:
        torch.manual_seed(3)
        return randomise_parameters_(WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
            rope_max_seq_len=cfg.rope_max_positions,
        )).eval()

    return build
