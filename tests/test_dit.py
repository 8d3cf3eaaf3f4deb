"""The Wan DiT: parity with diffusers, per-frame timesteps, action conditioning, meta init, input
errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mag.errors import ConfigError, InputError
from mag.models import WanDiT
from mag.weights import load_into, load_state_dict_any

TOLERANCE = 1e-5
# Parity with diffusers, relative to the output's largest value: the two implementations order
# float32 sums differently (measured 1e-6 to 2.5e-6 of the output scale with every parameter
# random); swapping the self-attention norm_q / norm_k weights, the subtlest mapping error, moves
# outputs by 8e-3 of it.
PARITY_RELATIVE = 1e-5


def test_matches_diffusers_wan_transformer(make_dit, diffusers_twin):
    model = make_dit()
    theirs = diffusers_twin(model.cfg)
    # Every parameter random, none left at a constant initial value (norms at 1, biases at 0): a
    # weight loaded into the wrong norm or modulation slot must change the output.
    assert all(p.std() > 0.1 for p in theirs.parameters() if p.numel() > 1)
    load_into(model, load_state_dict_any(theirs.state_dict()))
    x = torch.randn(2, model.cfg.in_channels, 3, 8, 6)  # diffusers layout [B, C, F, H, W]
    t = torch.tensor([999.0, 317.0])
    ctx = torch.randn(2, 7, model.cfg.text_dim)
    with torch.no_grad():
        expected = theirs(x, t, ctx, return_dict=False)[0]
        ours = model(x.transpose(1, 2), t, ctx).transpose(1, 2)
    scale = expected.abs().max()
    assert scale > 0.1
    assert (ours - expected).abs().max() <= PARITY_RELATIVE * scale


def test_each_frame_is_modulated_by_its_own_timestep(make_dit):
    # With frames isolated (identity frame mask) a sequence with one t per frame must equal each
    # frame run alone with its own scalar t at its own position; a shared-t model would fail this.
    model = make_dit()
    x = torch.randn(1, 3, 4, 4, 4)
    ctx = torch.randn(1, 5, model.cfg.text_dim)
    t = torch.tensor([[100.0, 500.0, 900.0]])
    with torch.no_grad():
        joint = model(x, t, ctx, frame_mask=torch.eye(3, dtype=torch.bool))
        for f in range(3):
            alone = model(x[:, f:f + 1], t[:, f], ctx, frame_positions=[f])
            assert (joint[:, f:f + 1] - alone).abs().max() <= TOLERANCE
        shared = model(x, t[:, 1], ctx, frame_mask=torch.eye(3, dtype=torch.bool))
    assert (shared[:, 1] - joint[:, 1]).abs().max() <= TOLERANCE
    assert (shared[:, 0] - joint[:, 0]).abs().max() > 1e-3


def test_scalar_timestep_broadcasts_over_frames(make_dit):
    model = make_dit()
    x, ctx = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5, model.cfg.text_dim)
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), model(x, t[:, None].expand(2, 3), ctx))


def test_cross_attention_cache_equals_raw_context(make_dit):
    model = make_dit()
    x, ctx = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 5, model.cfg.text_dim)
    with torch.no_grad():
        assert torch.equal(model(x, torch.ones(1), ctx), model(x, torch.ones(1),
                                                               model.encode_context(ctx)))


def test_output_depends_on_actions_only_when_enabled(make_dit):
    model = make_dit(action_dim=3)
    x, ctx = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 5, model.cfg.text_dim)
    a = torch.randn(1, 3, 3)
    with torch.no_grad():
        with_a = model(x, torch.ones(1), ctx, actions=a)
        other = model(x, torch.ones(1), ctx, actions=-a)
        none = model(x, torch.ones(1), ctx)
        zero = model(x, torch.ones(1), ctx, actions=torch.zeros(1, 3, 3))
    assert (with_a - other).abs().max() > 1e-3
    assert torch.equal(none, zero)
    plain = make_dit()
    assert not any("action" in name for name, _ in plain.named_parameters())
    with pytest.raises(InputError, match="action_dim=0"):
        plain(x, torch.ones(1), ctx, actions=a)


def test_meta_build_then_init_weights_matches_direct_build(tiny_dit_cfg):
    with torch.device("meta"):
        model = WanDiT(tiny_dit_cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    direct = WanDiT(tiny_dit_cfg)
    assert torch.equal(model.rope.cos, direct.rope.cos) and torch.equal(model.rope.sin,
                                                                        direct.rope.sin)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Wan zero-initialises the output layer: a fresh model predicts exactly zero.
    out = model(torch.randn(1, 3, 4, 4, 4), torch.ones(1), torch.randn(1, 5, tiny_dit_cfg.text_dim))
    assert out.shape == (1, 3, 4, 4, 4) and not out.any()


def test_bad_inputs_name_what_was_expected(make_dit, tiny_dit_cfg):
    model = make_dit()
    ctx = torch.randn(1, 5, model.cfg.text_dim)
    with pytest.raises(InputError, match=r"x must be \[B, F, 4, H, W\]"):
        model(torch.randn(1, 3, 5, 4, 4), torch.ones(1), ctx)
    with pytest.raises(InputError, match="timestep must be"):
        model(torch.randn(1, 3, 4, 4, 4), torch.ones(1, 2), ctx)
    with pytest.raises(InputError, match="frame_mask must be bool"):
        model(torch.randn(1, 3, 4, 4, 4), torch.ones(1), ctx, frame_mask=torch.ones(2, 2,
                                                                                    dtype=torch.bool))
    with pytest.raises(InputError, match="frame positions must lie"):
        model(torch.randn(1, 3, 4, 4, 4), torch.ones(1), ctx, frame_positions=[1000, 1001, 1002])
    with pytest.raises(ConfigError, match=r"patch_size\[0\] must be 1"):
        WanDiT(dataclasses.replace(tiny_dit_cfg, patch_size=(2, 2, 2)))


def test_grouped_and_dense_mask_paths_agree(make_dit):
    # Rows 0 and 2 are identical, so the grouped path must also restore the query order.
    model = make_dit()
    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(6, 6, generator=gen) > 0.5) | torch.eye(6, dtype=torch.bool)
    mask[2] = mask[0] | (torch.arange(6) == 2)
    mask[0] = mask[2]
    x, ctx = torch.randn(2, 6, 4, 4, 4, generator=gen), torch.randn(2, 5, model.cfg.text_dim,
                                                                    generator=gen)
    t = torch.rand(2, 6, generator=gen) * 1000
    with torch.no_grad():
        model.mask_execution = "dense"
        dense = model(x, t, ctx, frame_mask=mask)
        model.mask_execution = "grouped"
        grouped = model(x, t, ctx, frame_mask=mask)
        bidirectional = model(x, t, ctx)
    assert (dense - grouped).abs().max() <= TOLERANCE
    assert (dense - bidirectional).abs().max() > 1e-3
    with pytest.raises(InputError, match="attend to no key frame"):
        model(x, t, ctx, frame_mask=torch.zeros(6, 6, dtype=torch.bool))


def test_float32_math_by_type_promotion_is_bit_identical_to_explicit_casts():
    """modulate, gated_residual and apply_rotary skip the full-size ``.float()`` copies of their
    bf16 inputs and let promotion compute in float32: the results must be exactly those of casting
    first."""
    from mag.models.layers import apply_rotary, gated_residual, modulate, rotation_tables

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 16, generator=gen).bfloat16()
    y = torch.randn(2, 3, 5, 16, generator=gen).bfloat16()
    shift, scale, gate = (torch.randn(2, 3, 1, 16, generator=gen) for _ in range(3))
    assert torch.equal(modulate(x, shift, scale), x.float() * (1 + scale) + shift)
    assert torch.equal(gated_residual(x, y, gate), x.float() + y.float() * gate)
    assert modulate(x, shift, scale).dtype == gated_residual(x, y, gate).dtype == torch.float32

    # RoPE as x * cos + swap(x) * signed sin over full-width tables: the textbook pairwise rotation
    # exactly, with shared [N, D/2] angles and with per-sample (camera-anchored) [B, N, D/2] angles.
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(2, 4, 6, 8, generator=gen).to(dtype)
        for angles in (torch.randn(6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)):
            cos, sin = angles.cos(), angles.sin()
            c, s_ = (cos[:, None], sin[:, None]) if angles.dim() == 3 else (cos, sin)
            pairs = q.float().unflatten(-1, (-1, 2))
            expected = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s_,
                                    pairs[..., 0] * s_ + pairs[..., 1] * c],
                                    dim=-1).flatten(-2).to(dtype)
            assert torch.equal(apply_rotary(q, *rotation_tables(cos, sin)), expected)


def test_bf16_model_keeps_float32_rope_tables(tiny_dit_cfg):
    """``model.to(torch.bfloat16)`` casts every float buffer; the RoPE tables must stay float32 (Wan
    rotates in float32), also through the meta-device build and ``to_empty``."""
    direct = WanDiT(tiny_dit_cfg).to(torch.bfloat16)
    with torch.device("meta"):
        built = WanDiT(tiny_dit_cfg).to(torch.bfloat16)
    built.to_empty(device="cpu")
    built.init_weights()
    fp32 = WanDiT(tiny_dit_cfg)
    for model in (direct, built):
        assert model.rope.cos.dtype == model.rope.sin.dtype == torch.float32
        assert torch.equal(model.rope.cos, fp32.rope.cos) and torch.equal(model.rope.sin,
                                                                          fp32.rope.sin)
        assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    cos, _ = direct.rope(torch.arange(3), 2, 2)
    assert cos.dtype == torch.float32


def test_bf16_model_computes_time_embedding_and_head_in_float32(tiny_dit_cfg):
    """As in Wan: a bf16 model's time embedding and projection (hence every modulation) and its
    output head run in float32, so they equal a float32 model's with the same (bf16-rounded) weights
    exactly."""
    from mag.models.layers import sinusoidal_embedding

    torch.manual_seed(0)
    fp32 = WanDiT(tiny_dit_cfg)
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_((torch.randn_like(p) * 0.3).bfloat16().float())
    bf16 = WanDiT(tiny_dit_cfg)
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    t_emb = sinusoidal_embedding(torch.tensor([[999.0, 500.0, 3.0]]), tiny_dit_cfg.freq_dim)
    e = bf16.time_embedding(t_emb)
    assert e.dtype == torch.float32 and torch.equal(e, fp32.time_embedding(t_emb))
    assert torch.equal(bf16.time_projection(e), fp32.time_projection(e))
    # The head's LayerNorm output is rounded to the activations' dtype, as Wan's is; the rest is
    # float32.
    tokens = torch.randn(1, 3 * 4, tiny_dit_cfg.dim).bfloat16()
    out = bf16.head(tokens, e)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fp32.head(tokens.float(), e), rtol=2e-2, atol=2e-2)
