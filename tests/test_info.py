"""``mag info``: exact parameter count on the meta device, token geometry, KV bytes, errors."""

from __future__ import annotations

import json

import torch
from diffusers import WanTransformer3DModel

from mag.cli import main


def test_wan_1_3b_params_match_diffusers_and_tokens_per_frame(capsys):
    assert main(["info", "--preset", "wan-1.3b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with torch.device("meta"):  # Wan2.1-T2V-1.3B transformer config
        theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12,
                                       attention_head_dim=128,
                                       in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                                       ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6)
    assert info["params"] == sum(p.numel() for p in theirs.parameters())
    assert info["tokens_per_frame"] == 1560
    assert (info["num_layers"], info["dim"], info["num_heads"]) == (30, 1536, 12)
    assert info["kv_bytes_per_frame_bf16"] == 2 * 30 * 1560 * 1536 * 2
    assert info["preset"] == "wan-1.3b"


def test_text_output_lists_the_fields(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tokens_per_frame" in out and "params" in out


def test_unknown_preset_exits_2_with_the_config_error(capsys):
    assert main(["info", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "wan-1.3b" in err
