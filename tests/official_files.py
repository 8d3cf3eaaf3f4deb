"""Writers of small files in the upstream releases' own formats (random weights, upstream key names
and folder layouts), so loaders and commands are tested on what users download. Layouts:

- Wan2.1 folder: ``config.json`` (WanModel's config names) +
  ``diffusion_pytorch_model.safetensors``, ``Wan2.1_VAE.pth`` (original VAE names),
  ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's T5 names) and the ``google/umt5-xxl/`` tokenizer folder
  (MiniLM's tokenizer stands in: the real one is not offline);
- official MAG generator / memory folder: ``config.json`` (CausalWanModel's) + the safetensors;
- Self-Forcing ``.pt``: ``{"generator", "generator_ema", "critic"}`` with the ``model.`` prefix.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mag.codecs import WanVAECodec
from mag.models import WanDiT
from mag.text import UMT5Encoder, minilm_path
from mag.text.umt5_wan import WAN_T5_FILE, WAN_T5_TOKENIZER, hf_to_wan_t5
from mag.weights import wan_to_diffusers

WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_VAE = "Wan2.1_VAE.pth"

# Original Wan2.1 VAE names of the diffusers parameters (the checkpoint ``Wan2.1_VAE.pth`` uses
# these). Written from the structure; test_codecs checks it against diffusers' own converter.
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
             "conv2": "residual.6", "conv_shortcut": "shortcut"}
_HEAD = {"norm_out": "head.0", "conv_out": "head.2", "conv_in": "conv1"}


def vae_original_name(key: str) -> str:
    """diffusers ``AutoencoderKLWan`` parameter name -> its name in ``Wan2.1_VAE.pth``."""
    name, param = key.rsplit(".", 1)
    if name in ("quant_conv", "post_quant_conv"):
        return f"{'conv1' if name == 'quant_conv' else 'conv2'}.{param}"
    part, rest = name.split(".", 1)
    if rest in _HEAD:
        return f"{part}.{_HEAD[rest]}.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest):
        return f"{part}.middle.{2 * int(m[1])}.{_RESIDUAL[m[2]]}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{part}.middle.1.{m[1]}.{param}"
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.(\w+)", rest)) and m[2] in _RESIDUAL:
        return f"{part}.downsamples.{m[1]}.{_RESIDUAL[m[2]]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{part}.downsamples.{m[1]}.{m[2]}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest):
        return f"{part}.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESIDUAL[m[3]]}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{part}.upsamples.{4 * int(m[1]) + 3}.{m[2]}.{param}"
    raise AssertionError(f"no original name for {key}")


def wan_config(dit: WanDiT, class_name: str) -> dict:
    """The config.json a Wan ``ModelMixin`` writes (WanModel / CausalWanModel names; patch size,
    text width and the norms flags are not saved by CausalWanModel, so they are left out, as
    upstream does)."""
    cfg = dit.cfg
    return {"_class_name": class_name, "_diffusers_version": "0.31.0", "model_type": "t2v",
            "text_len": 512,
            "in_dim": cfg.in_channels, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
            "freq_dim": cfg.freq_dim,
            "out_dim": cfg.out_channels, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
            "eps": cfg.eps, "window_size": [-1, -1]}


def _save_dit(dit: WanDiT, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))


def write_mag_folder(dit: WanDiT, folder: Path) -> Path:
    """An official MAG generator or memory folder (CausalWanModel.save_pretrained's layout)."""
    folder.mkdir(parents=True)
    config = {**wan_config(dit, "CausalWanModel"), "local_attn_size": 21, "sink_size": 2,
              "num_frame_per_block": 3, "cache_mode": "block_compress", "is_inference_mode": True}
    (folder / "config.json").write_text(json.dumps(config))
    _save_dit(dit, folder / WAN_WEIGHTS)
    return folder


def write_wan_folder(dit: WanDiT, vae: WanVAECodec, t5: UMT5Encoder, folder: Path) -> Path:
    """An original Wan2.1-T2V release folder at small widths."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(wan_config(dit, "WanModel")))
    _save_dit(dit, folder / WAN_WEIGHTS)
    torch.save({vae_original_name(k): v for k, v in vae.vae.state_dict().items()}, folder / WAN_VAE)
    torch.save(hf_to_wan_t5(t5._hf.model.state_dict()), folder / WAN_T5_FILE)
    shutil.copytree(minilm_path(), folder / WAN_T5_TOKENIZER)
    return folder


def write_diffusers_folder(dit: WanDiT, folder: Path) -> Path:
    """A diffusers ``WanTransformer3DModel`` folder (config.json with its own names)."""
    folder.mkdir(parents=True)
    cfg = dit.cfg
    config = {"_class_name": "WanTransformer3DModel", "num_attention_heads": cfg.num_heads,
              "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels, "eps": cfg.eps}
    (folder / "config.json").write_text(json.dumps(config))
    state = wan_to_diffusers(dit.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WAN_WEIGHTS))
    return folder


def write_self_forcing(raw: WanDiT, ema: WanDiT, path: Path) -> Path:
    """A Self-Forcing training checkpoint: both generators under the wrapper's ``model.`` prefix."""
    def wrapped(dit: WanDiT) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v.clone() for k, v in dit.state_dict().items()}

    torch.save({"generator": wrapped(raw), "generator_ema": wrapped(ema),
                "critic": {"model.head.head.weight": torch.zeros(2, 2)}}, path)
    return path
