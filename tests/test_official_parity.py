"""Our DiT, Wan VAE codec and schedule against tensors made by the official upstream code.

tests/data/official/ is written by scripts/official_reference.py (see its README): official Wan2.1 /
MAG modules at small configs with fully random weights, saved in the official file formats. Both
sides run in float32; the remaining differences come from operation order (the official RoPE runs in
float64, attention through a different kernel), measured at ~1e-7 of the output's scale. The bound
of 1e-4 of that scale leaves room for other BLAS builds, while a single mis-mapped tensor moves
outputs by O(1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from mag.codecs import WanVAECodec
from mag.config import DiTConfig, SchedulerConfig, get_preset
from mag.models.dit import WanDiT
from mag.schedulers import FlowMatchScheduler
from mag.weights import load_into, load_state_dict_any

DATA = Path(__file__).parent / "data" / "official"
RELATIVE_TOLERANCE = 1e-4
# A swapped tensor must move the output by far more than the tolerance.
MAPPING_ERROR_FLOOR = 1e-2
# Timesteps near 1000 are float32 with a spacing of 6.1e-5; the two tables are built in different
# orders.
FLOAT32_ULPS_AT_1000 = 2.5e-4


def _reference(name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = DATA / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        about = json.loads(f.metadata()["about"])
    return load_file(str(path)), about


def _relative_error(ours: Tensor, ref: Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _dit_from_official_folder(folder: Path, text_dim: int) -> WanDiT:
    """Our DiT shaped by an official ``config.json`` (without ``text_dim``), weights read by
    mag.weights."""
    config = json.loads((folder / "config.json").read_text())
    cfg = DiTConfig(in_channels=config["in_dim"], out_channels=config["out_dim"], dim=config["dim"],
                    ffn_dim=config["ffn_dim"], num_heads=config["num_heads"],
                    num_layers=config["num_layers"],
                    text_dim=text_dim, freq_dim=config["freq_dim"], eps=config["eps"])
    model = WanDiT(cfg).eval()
    load_into(model, load_state_dict_any(folder))
    return model


def _dit_output(model: WanDiT, ref: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(ref["x"], ref["timestep"], ref["context"])


def test_dit_forward_equals_the_official_wan_model_loaded_from_its_folder():
    ref, about = _reference("dit_forward")
    model = _dit_from_official_folder(DATA / "wan_dit", about["config"]["text_dim"])
    assert _relative_error(_dit_output(model, ref), ref["output"]) < RELATIVE_TOLERANCE


def test_dit_parity_check_catches_swapped_layers():
    ref, about = _reference("dit_forward")
    model = _dit_from_official_folder(DATA / "wan_dit", about["config"]["text_dim"])
    first, second = model.blocks[0].state_dict(), model.blocks[1].state_dict()
    model.blocks[0].load_state_dict(second)
    model.blocks[1].load_state_dict(first)
    assert _relative_error(_dit_output(model, ref), ref["output"]) > MAPPING_ERROR_FLOOR


@pytest.mark.parametrize("folder", ["mag_generator", "mag_memory"])
def test_official_mag_folders_load_with_every_tensor_random(folder):
    state = load_state_dict_any(DATA / folder)
    model = _dit_from_official_folder(DATA / folder,
                                      text_dim=state["text_embedding.0.weight"].shape[1])
    constant = [k for k, v in model.state_dict().items() if v.numel() > 1 and v.std() == 0]
    assert constant == []


def _vae_codec() -> WanVAECodec:
    _, about = _reference("vae_decode")
    small = about["config"]
    same_names = ("dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
    config = {"base_dim": small["dim"], **{k: small[k] for k in same_names}}
    return WanVAECodec.from_pretrained(DATA / "wan_vae.pth", config=config)


def test_wan_vae_decode_from_the_original_pth_equals_the_official_whole_video_decode():
    ref, _ = _reference("vae_decode")
    video = _vae_codec().decode(ref["latents"])
    assert video.shape == ref["video"].shape
    assert _relative_error(video, ref["video"]) < RELATIVE_TOLERANCE


def test_wan_vae_stream_decoder_equals_the_official_whole_video_decode():
    ref, _ = _reference("vae_decode")
    stream = _vae_codec().stream_decoder()
    latents = ref["latents"]
    video = torch.cat([stream.decode(latents[:, i : i + 1]) for i in range(latents.shape[1])],
                      dim=1)
    assert _relative_error(video, ref["video"]) < RELATIVE_TOLERANCE


def test_wan_preset_few_step_schedule_equals_the_official_warped_schedule():
    ref, about = _reference("schedule")
    official = about["inference"]
    preset = get_preset("wan-1.3b").scheduler
    assert preset.shift == official["timestep_shift"]
    assert list(preset.denoising_steps) == official["denoising_step_list"]
    scheduler = FlowMatchScheduler(preset)
    timesteps = scheduler.few_step_timesteps()
    torch.testing.assert_close(timesteps, ref["denoising_timesteps"], rtol=0, atol=1e-4)
    torch.testing.assert_close(scheduler.sigma(timesteps), ref["denoising_sigmas"], rtol=0,
                               atol=1e-6)


def test_sampling_timesteps_equal_the_official_thousand_step_table():
    ref, about = _reference("schedule")
    scheduler = FlowMatchScheduler(SchedulerConfig(shift=about["inference"]["timestep_shift"]))
    table = scheduler.sampling_timesteps(ref["timesteps"].numel())
    torch.testing.assert_close(table, ref["timesteps"], rtol=0, atol=FLOAT32_ULPS_AT_1000)
    torch.testing.assert_close(scheduler.sigma(table), ref["sigmas"], rtol=0, atol=1e-6)
