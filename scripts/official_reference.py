"""Make the reference tensors in tests/data/official/ by running the OFFICIAL upstream code on the
CPU.

The upstream code runs from checked-out copies OUTSIDE this repository and is never copied into it::

    for x in Xilluill+MAG Wan-Video+Wan2.1; do mkdir -p /tmp/$x && git --git-dir=<mirror>/$x/repo \
        archive HEAD | tar -x -C /tmp/$x; done
    pip install --target /tmp/refdeps ftfy einops easydict && pip install --no-deps \
        --target /tmp/refdeps accelerate                      # upstream imports; not project deps
    PYTHONPATH=/tmp/refdeps python scripts/official_reference.py --mag /tmp/Xilluill+MAG \
        --wan /tmp/Wan-Video+Wan2.1                            # rewrites tests/data/official/

Upstream commits used: Wan-Video/Wan2.1 9737cba9c1c3c4d04b33fcad41c111989865d315 (WanModel, WanVAE_
/ WanVAE, T5Encoder / umt5_xxl, HuggingfaceTokenizer cleaning) and Xilluill/MAG
08008c604c872b8a86123e3c4d13e4dda5806e08 (CausalWanModel with cache_mode="block_compress",
memory_generation_pipeline.inference_wo_text_encoder, FlowMatchScheduler,
configs/magbench_inference.yaml). MAG's scheduler equals Self-Forcing's (guandeh17/Self-Forcing
33593df) in everything used here.

Every weight is random (seeded) and fully randomised -- norm weights and biases, modulation tables
and the zero-initialised output head included -- so no key-mapping error can hide. Everything runs
in float32.

What is patched at runtime, and why (no upstream file is edited):
- ``flash_attention`` (``wan.modules.model`` of both repositories) and ``attention`` (MAG
  ``wan.modules.causal_model``): the first asserts CUDA, the second's no-flash fallback casts q/k/v
  to bf16. Both become float32 ``scaled_dot_product_attention`` over the same ``[B, L, heads,
  head_dim]`` tensors (key lengths masked), so the references are float32 and our float32 code can
  be held to ~1e-5.
- MAG's pipeline: the text encoder and VAE wrappers (they open the real 1.3B files) are stubbed --
  the loop is fed prompt embeddings and returns latents; ``_initialize_cache`` /
  ``_initialize_crossattn_cache`` and ``frame_seq_length`` / ``num_transformer_blocks`` hard-code
  the 1.3B shapes (12 heads x 128, 1560 tokens per frame, 30 layers, 512 text tokens) and are
  replaced by the same dicts at the small shapes. ``CausalWanModel.from_pretrained`` is given the
  small ``text_dim`` (the class leaves it out of config.json). ``scheduler.add_noise`` is wrapped to
  record the fresh noise of each re-noising step.
- Wan2.1 VAE: ``_video_vae`` fixes dim=96 / 2 residual blocks; it is given the small dims so the
  official ``WanVAE`` class (its mean/std, its clamp) decodes with the small ``.pth``.
- ``torch.cuda.current_device`` answers 0 while upstream modules are imported: both ``t5.py`` call
  it in a default argument at import time, which fails on a CPU-only torch.
The real umT5 tokenizer (google/umt5-xxl) cannot be had offline: the UMT5 reference records token
ids and masks (random ids in the tiny vocabulary, EOS-terminated, zero-padded) and, separately, the
official prompt cleaning (ftfy + HTML unescape + whitespace) applied to a few prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "official"
WAN_COMMIT = "9737cba9c1c3c4d04b33fcad41c111989865d315"
MAG_COMMIT = "08008c604c872b8a86123e3c4d13e4dda5806e08"
UPSTREAM_PACKAGES = ("wan", "model", "pipeline", "utils")
SEED = 0

# Small DiT shared by (a) and (b): head width 16 splits into RoPE parts 8/4/4 as in Wan.
DIT = dict(patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=32, ffn_dim=64, freq_dim=256,
           text_dim=24,
           out_dim=16, num_heads=2, num_layers=2, qk_norm=True, cross_attn_norm=True, eps=1e-6)
# Official MAG inference geometry (configs/magbench_inference.yaml).
MAG_INFERENCE = dict(num_frame_per_block=3, local_attn_size=21, sink_size=2,
                     denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True,
                     timestep_shift=5.0, num_train_timestep=1000, cache_mode="block_compress",
                     mixed_precision=False)
# ring of 21 compressed frames wraps at block 21; blocks 22..26 read a wrapped ring
STREAM_BLOCKS = 27
STREAM_LATENT_HW = (2, 4)  # 1 x 2 tokens per frame
# Small Wan VAE: the official architecture at width 3 (the 1.3B: 96);
# diffusers' convert_wan_vae_to_diffusers (our .pth loader) hard-codes its block layout.
VAE = dict(dim=3, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
VAE_HEAD_GAIN = 0.25
VAE_LATENT = (1, 16, 3, 4, 4)  # [B, z, F, h, w] -> video of 1 + 4*(F-1) = 9 frames of 32x32
# Tiny umT5 encoder (umt5_xxl keyword overrides).
UMT5 = dict(vocab_size=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, encoder_layers=2,
            decoder_layers=2, num_buckets=8, dropout=0.0)
UMT5_TEXT_LEN = 12
UMT5_SEQ_LENS = (5, 9, 1)  # the last one is the empty prompt: EOS alone
UMT5_EOS, UMT5_PAD = 1, 0
PROMPTS = ("A cat   walks\n on the beach.", "  Fish &amp; chips &lt;3 at dawn\t", "cafÃ© at night",
           "")


# ---------------------------------------------------------------------------------------------
# Importing upstream code


@contextlib.contextmanager
def upstream(root: Path) -> Iterator[None]:
    """Import from ``root`` with its packages' ``__init__`` skipped (they pull in unrelated
    pipelines)."""
    for name in list(sys.modules):
        if name.split(".")[0] in UPSTREAM_PACKAGES:
            del sys.modules[name]
    for name in UPSTREAM_PACKAGES + ("wan.modules",):
        package = types.ModuleType(name)
        package.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = package
    sys.path.insert(0, str(root))
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # evaluated as a default argument when t5.py is imported
    try:
        yield
    finally:
        torch.cuda.current_device = current_device
        sys.path.remove(str(root))


def sdpa_float32(q: Tensor, k: Tensor, v: Tensor, q_lens: Tensor | None = None,
                 k_lens: Tensor | None = None,
                 dropout_p: float = 0.0, softmax_scale: float | None = None,
                 q_scale: float | None = None,
                 causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                 deterministic: bool = False,
                 dtype: Any = None, version: Any = None, fa_version: Any = None) -> Tensor:
    """Stand-in for Wan's flash attention: ``[B, L, N, D]`` in and out, float32, key lengths
    masked."""
    assert q_lens is None and not causal and window_size == (-1, -1) and q_scale is None
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1])[None, :] < k_lens[:, None]).view(k.shape[0], 1, 1,
                                                                          k.shape[1])
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=mask,
                                         scale=softmax_scale)
    return out.transpose(1, 2).type_as(q)


# ---------------------------------------------------------------------------------------------
# Random weights


@torch.no_grad()
def randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Redraw every parameter: matrices ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.04), the rest N(0,
    0.04)."""
    for name, p in module.named_parameters():
        if "modulation" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        # VAE / DiT, T5 norms
        elif name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def save(tensors: dict[str, Tensor], path: Path, **meta: Any) -> None:
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    # One metadata key: safetensors orders several keys at random, one keeps reruns byte-identical.
    save_file(tensors, str(path), metadata={"about": json.dumps(meta, sort_keys=True)})


# ---------------------------------------------------------------------------------------------
# (a) Wan2.1 WanModel forward


def dit_forward(wan: Path, out: Path, gen: torch.Generator) -> None:
    with upstream(wan):
        import wan.modules.model as wan_model
    wan_model.flash_attention = sdpa_float32
    model = wan_model.WanModel(model_type="t2v", **DIT).eval()
    randomise(model, gen)
    # the Wan2.1-T2V-1.3B folder layout: config.json + safetensors
    model.save_pretrained(out / "wan_dit")

    frames, h, w = 3, 4, 6
    x = torch.randn(2, frames, DIT["in_dim"], h, w, generator=gen)
    t = torch.tensor([937.5, 250.0])
    lens = (5, 11)
    context = torch.zeros(2, DIT["text_len"], DIT["text_dim"])
    for i, n in enumerate(lens):
        context[i, :n] = torch.randn(n, DIT["text_dim"], generator=gen)
    seq_len = frames * (h // 2) * (w // 2)
    with torch.no_grad():
        texts = [c[:n] for c, n in zip(context, lens, strict=True)]
        y = model([u.transpose(0, 1) for u in x], t=t, context=texts, seq_len=seq_len)
    y = torch.stack(y).transpose(1, 2)
    save({"x": x, "timestep": t, "context": context, "output": y}, out / "dit_forward.safetensors",
         config=DIT, upstream=f"Wan-Video/Wan2.1@{WAN_COMMIT} wan/modules/model.py WanModel")


# ---------------------------------------------------------------------------------------------
# (b) MAG streaming rollout


def _mag_cache_shapes(pipeline_cls: type) -> None:
    """The official cache dicts, at the small model's heads / head width / text length."""
    heads, head_dim = DIT["num_heads"], DIT["dim"] // DIT["num_heads"]

    def init_cache(self: Any, batch_size: int, kv_cache_size: int, sink_size: int, dtype: Any,
                   device: Any) -> None:
        def zeros(n: int) -> Tensor:
            return torch.zeros([batch_size, n, heads, head_dim], dtype=dtype, device=device)
        self.kv_cache1 = [dict(k=zeros(kv_cache_size), v=zeros(kv_cache_size),
                               global_end_index=torch.tensor([0]),
                               local_end_index=torch.tensor([0]),
                               sink_k=zeros(sink_size), sink_v=zeros(sink_size))
                          for _ in range(self.num_transformer_blocks)]

    def init_cross(self: Any, batch_size: int, dtype: Any, device: Any) -> list[dict[str, Tensor]]:
        n = DIT["text_len"]
        return [dict(k=torch.zeros([batch_size, n, heads, head_dim], dtype=dtype, device=device),
                     v=torch.zeros([batch_size, n, heads, head_dim], dtype=dtype, device=device),
                     is_init=torch.tensor([False])) for _ in range(self.num_transformer_blocks)]

    pipeline_cls._initialize_cache = init_cache
    pipeline_cls._initialize_crossattn_cache = init_cross


def _from_small_folder(cls: type, path: str, **kwargs: Any) -> nn.Module:
    """``CausalWanModel.from_pretrained`` for the small folder: ``text_dim`` is in the class's
    ``ignore_for_config`` (config.json never stores it, 4096 is assumed), so it is given here."""
    config = json.loads((Path(path) / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = cls(**{**config, **kwargs, "text_dim": DIT["text_dim"]})
    model.load_state_dict(load_file(str(Path(path) / "diffusion_pytorch_model.safetensors")))
    return model.eval()


class _StubText(nn.Module):
    def __init__(self, empty: Tensor) -> None:
        super().__init__()
        self.empty = empty

    def forward(self, text_prompts: list[str]) -> dict[str, Tensor]:
        assert all(p == "" for p in text_prompts)
        return {"prompt_embeds": self.empty.expand(len(text_prompts), -1, -1)}


class _StubVAE(nn.Module):
    device = torch.device("cpu")

    def decode_to_pixel(self, latent: Tensor, use_cache: bool = False,
                        offload_cpu: bool = False) -> Tensor:
        return latent


def mag_stream(mag: Path, out: Path, gen: torch.Generator) -> None:
    with upstream(mag):
        import pipeline.memory_generation_pipeline as mgp
        import wan.modules.causal_model as causal
        import wan.modules.model as mag_model
    causal.attention = sdpa_float32
    mag_model.flash_attention = sdpa_float32  # cross-attention
    kwargs = {k: v for k, v in DIT.items()}
    for name in ("mag_generator", "mag_memory"):
        model = causal.CausalWanModel(model_type="t2v", **kwargs)
        randomise(model, gen)
        model.save_pretrained(out / name)  # MAG's checkpoint folders: config.json + safetensors

    context = torch.zeros(1, DIT["text_len"], DIT["text_dim"])
    context[0, :7] = torch.randn(7, DIT["text_dim"], generator=gen)
    empty = torch.zeros(1, DIT["text_len"], DIT["text_dim"])
    empty[0, :1] = torch.randn(1, DIT["text_dim"], generator=gen)  # "" -> EOS alone, then zeros

    loader = functools.partial(_from_small_folder, causal.CausalWanModel)
    mgp.CausalWanModel = types.SimpleNamespace(from_pretrained=loader)
    mgp.WanTextEncoder = lambda device: _StubText(empty)
    mgp.WanVAEWrapper = lambda device: _StubVAE()
    _mag_cache_shapes(mgp.memory_generation_pipeline)
    args = types.SimpleNamespace(generator_ckpt=str(out / "mag_generator"),
                                 memory_ckpt=str(out / "mag_memory"), **MAG_INFERENCE)
    pipe = mgp.memory_generation_pipeline(args, device=torch.device("cpu"))
    h, w = STREAM_LATENT_HW
    pipe.frame_seq_length = (h // 2) * (w // 2)
    pipe.num_transformer_blocks = DIT["num_layers"]

    renoise: list[Tensor] = []
    add_noise = pipe.scheduler.add_noise

    def recording_add_noise(x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        renoise.append(noise.clone())
        return add_noise(x0, noise, timestep)

    pipe.scheduler.add_noise = recording_add_noise
    frames = STREAM_BLOCKS * MAG_INFERENCE["num_frame_per_block"]
    noise = torch.randn(1, frames, DIT["in_dim"], h, w, generator=gen)
    torch.manual_seed(SEED)  # the loop's own torch.randn_like draws; recorded above
    with torch.no_grad():
        pipe.init_state(noise)
        _, latents = pipe.inference_wo_text_encoder(noise=noise, text_prompts_embedds=context)
    steps = len(MAG_INFERENCE["denoising_step_list"]) - 1
    # [blocks, steps, 3, C, h, w]
    renoise_t = torch.stack(renoise).unflatten(0, (STREAM_BLOCKS, steps))
    save({"noise": noise, "renoise": renoise_t, "context": context, "empty_context": empty,
          "output": latents,
          "timesteps": pipe.denoising_step_list.float()}, out / "mag_stream.safetensors",
         config=DIT, inference=MAG_INFERENCE, blocks=STREAM_BLOCKS,
         upstream=f"Xilluill/MAG@{MAG_COMMIT} pipeline/memory_generation_pipeline.py"
                  " inference_wo_text_encoder")


# ---------------------------------------------------------------------------------------------
# (c) Wan VAE decode, (d) umT5 encoder, (e) schedule


def vae_decode(wan: Path, out: Path, gen: torch.Generator) -> None:
    with upstream(wan):
        import wan.modules.vae as vae_module
    small = dict(attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, **VAE)
    model = vae_module.WanVAE_(z_dim=VAE_LATENT[1], **small)
    randomise(model, gen)
    # keep most decoded pixels inside the [-1, 1] clamp
    model.decoder.head[-1].weight.mul_(VAE_HEAD_GAIN)
    torch.save(model.state_dict(), out / "wan_vae.pth")  # the Wan2.1_VAE.pth layout
    vae_module._video_vae = functools.partial(vae_module._video_vae, **VAE)
    official = vae_module.WanVAE(z_dim=VAE_LATENT[1], vae_pth=str(out / "wan_vae.pth"),
                                 device="cpu")
    z = torch.randn(VAE_LATENT, generator=gen)
    with torch.no_grad():
        video = official.decode([z[0]])[0]
    save({"latents": z.transpose(1, 2), "video": video.transpose(0, 1)[None]},
         out / "vae_decode.safetensors",
         config=small, upstream=f"Wan-Video/Wan2.1@{WAN_COMMIT} wan/modules/vae.py WanVAE.decode")


def umt5_encode(wan: Path, out: Path, gen: torch.Generator) -> None:
    with upstream(wan):
        import wan.modules.t5 as t5
        import wan.modules.tokenizers as tokenizers
    model = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.float32,
                        device="cpu", **UMT5).eval()
    randomise(model, gen)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    # models_t5_umt5-xxl-enc-bf16.pth layout, bf16 values
    torch.save(state, out / "umt5_enc_bf16.pth")
    # float32 model holding the bf16 values, as WanTextEncoder(dtype=float32)
    model.load_state_dict(state)
    ids = torch.full((len(UMT5_SEQ_LENS), UMT5_TEXT_LEN), UMT5_PAD)
    for i, n in enumerate(UMT5_SEQ_LENS):
        ids[i, : n - 1] = torch.randint(2, UMT5["vocab_size"], (n - 1,), generator=gen)
        ids[i, n - 1] = UMT5_EOS
    mask = (torch.arange(UMT5_TEXT_LEN)[None] < torch.tensor(UMT5_SEQ_LENS)[:, None]).long()
    with torch.no_grad():
        hidden = model(ids, mask)
    for row, n in zip(hidden, UMT5_SEQ_LENS, strict=True):
        row[n:] = 0.0  # MAG's WanTextEncoder zeroes the padding rows
    tok = tokenizers.HuggingfaceTokenizer.__new__(tokenizers.HuggingfaceTokenizer)
    tok.clean = "whitespace"
    cleaned = [tok._clean(p) for p in PROMPTS]
    save({"ids": ids.float(), "mask": mask.float(), "hidden": hidden},
         out / "umt5_encode.safetensors", config=UMT5, prompts=list(PROMPTS), cleaned=cleaned,
         upstream=f"Wan-Video/Wan2.1@{WAN_COMMIT} wan/modules/t5.py umt5_xxl(encoder_only=True)")


def schedule(mag: Path, out: Path) -> None:
    with upstream(mag):
        from utils.scheduler import FlowMatchScheduler
    scheduler = FlowMatchScheduler(shift=MAG_INFERENCE["timestep_shift"], sigma_min=0.0,
                                   extra_one_step=True)
    scheduler.set_timesteps(1000, training=True)
    steps = torch.tensor(MAG_INFERENCE["denoising_step_list"], dtype=torch.long)
    table = torch.cat((scheduler.timesteps.cpu(), torch.tensor([0], dtype=torch.float32)))
    warped = table[1000 - steps]  # memory_generation_pipeline.__init__ with warp_denoising_step
    ids = torch.argmin((scheduler.timesteps[None] - warped[:, None]).abs(), dim=1)
    save({"timesteps": scheduler.timesteps, "sigmas": scheduler.sigmas,
          "denoising_timesteps": warped,
          "denoising_sigmas": scheduler.sigmas[ids]}, out / "schedule.safetensors",
          inference=MAG_INFERENCE,
         upstream=f"Xilluill/MAG@{MAG_COMMIT} utils/scheduler.py FlowMatchScheduler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mag", type=Path, required=True, help="checked-out Xilluill/MAG")
    parser.add_argument("--wan", type=Path, required=True, help="checked-out Wan-Video/Wan2.1")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for root in (args.mag, args.wan):
        if not (root / "wan" / "modules" / "model.py").is_file():
            parser.error(f"{root} is not a checkout of MAG / Wan2.1 (no wan/modules/model.py)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(SEED)
    dit_forward(args.wan, args.out, gen)
    mag_stream(args.mag, args.out, gen)
    vae_decode(args.wan, args.out, gen)
    umt5_encode(args.wan, args.out, gen)
    schedule(args.mag, args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
