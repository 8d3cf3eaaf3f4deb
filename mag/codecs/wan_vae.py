"""The Wan2.1 causal video VAE (diffusers ``AutoencoderKLWan``) behind the codec interface.

T = 1 + 4k video frames <-> 1 + k latent frames of ``z_dim`` channels, 8x smaller in space; latents
are the posterior mean normalised per channel with the config's ``latents_mean`` / ``latents_std``.
:class:`WanStreamDecoder` decodes latent frames as they arrive and equals one-shot decoding. The VAE
is frozen: encode / decode run without gradients. What this relies on in diffusers:
docs/codecs-and-text.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mag.codecs.base import VIDEO_CHANNELS, Codec, StreamDecoder
from mag.errors import CheckpointError, ConfigError, InputError

__all__ = ["WanVAECodec", "WanStreamDecoder", "TINY_WAN_VAE_CONFIG"]

TINY_WAN_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
"""A random Wan-layout VAE small enough for CPU tests (same 4x temporal / 8x spatial
compression)."""

WAN_VAE_FILE = "Wan2.1_VAE.pth"
"""The VAE file's name in the original Wan2.1 release folder."""
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
"""Single-file VAE checkpoints ``from_pretrained`` accepts (the original release is
``Wan2.1_VAE.pth``)."""
_DIFFUSERS_MARKER_KEY = "encoder.conv_in.weight"
_POST_QUANT_KEY = "post_quant_conv.weight"
_SHOWN_KEYS = 5


class WanVAECodec(Codec):
    """video [B, T, 3, H, W] in [-1, 1] <-> normalised latents [B, F, z_dim, H/8, W/8], F = 1 +
    (T-1)/4."""

    name = "wan-vae"

    def __init__(self, vae: Any) -> None:
        """Wrap a built ``diffusers.AutoencoderKLWan`` (``from_pretrained`` / ``from_config`` make
        one)."""
        from diffusers import AutoencoderKLWan

        if not isinstance(vae, AutoencoderKLWan):
            raise ConfigError("WanVAECodec wraps a diffusers AutoencoderKLWan, got "
                              f"{type(vae).__name__}")
        cfg = vae.config
        if cfg.patch_size is not None or cfg.is_residual or cfg.in_channels != VIDEO_CHANNELS:
            raise ConfigError(
                "only the Wan2.1 VAE layout is supported (patch_size=None, is_residual=False,"
                f" in_channels=3); got patch_size={cfg.patch_size}, is_residual={cfg.is_residual},"
                f" in_channels={cfg.in_channels}"
            )
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ConfigError(
                f"latents_mean / latents_std need z_dim={cfg.z_dim} entries, got"
                f" {len(cfg.latents_mean)} / {len(cfg.latents_std)}"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = int(cfg.z_dim)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1)
        self.temporal_compression = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        shape = (1, 1, self.latent_channels, 1, 1)
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        # one feature-cache slot per causal conv of the decoder, as diffusers' clear_cache()
        # allocates
        self._decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, seed: int = 0) -> WanVAECodec:
        """Random weights (seeded, global RNG untouched); ``config`` overrides AutoencoderKLWan
        defaults."""
        from diffusers import AutoencoderKLWan

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoencoderKLWan(**(config or {})))

    @classmethod
    def tiny_random(cls, seed: int = 0, **overrides: Any) -> WanVAECodec:
        """A tiny random VAE (``TINY_WAN_VAE_CONFIG``) with random latents_mean / latents_std, for
        tests."""
        config = {**TINY_WAN_VAE_CONFIG, **overrides}
        z_dim = config["z_dim"]
        gen = torch.Generator().manual_seed(seed)
        config.setdefault("latents_mean", torch.randn(z_dim, generator=gen).tolist())
        config.setdefault("latents_std", (torch.rand(z_dim, generator=gen) + 0.5).tolist())
        return cls.from_config(config, seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        config: dict[str, Any] | None = None) -> WanVAECodec:
        """Load real weights, offline.

        ``path`` is a diffusers folder (``config.json`` + weights, or a pipeline root holding
        ``vae/``), the original Wan2.1 folder (its ``Wan2.1_VAE.pth`` is read), or one
        original-format checkpoint file such as ``Wan2.1_VAE.pth`` (widths read from its shapes,
        converted with diffusers' ``convert_wan_vae_to_diffusers``; the architecture is
        AutoencoderKLWan's default, which is the Wan2.1 VAE; ``config`` overrides it, for single
        files only).
        """
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if path.is_dir() and (path / WAN_VAE_FILE).is_file():
            path = path / WAN_VAE_FILE
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise CheckpointError(
                    f"{path} is not a Wan VAE folder: expected {WAN_VAE_FILE}, or config.json in "
                    "it or in"
                    " vae/; pass the Wan2.1-T2V-1.3B folder, its -Diffusers folder, or a "
                    "Wan2.1_VAE.pth file"
                )
            try:
                vae = AutoencoderKLWan.from_pretrained(folder, local_files_only=True,
                                                       torch_dtype=dtype)
            except (OSError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"could not load the Wan VAE from {folder}: {err}") from err
            return cls(vae)
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            return cls(_load_single_file(path, dtype, config or {}))
        raise CheckpointError(
            f"Wan VAE weights not found at {path}: expected a diffusers folder or a file ending in"
            f" {', '.join(CHECKPOINT_SUFFIXES)} (e.g. Wan2.1_VAE.pth)"
        )

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> WanVAECodec:
        """Move the VAE (and its normalisation constants) to ``device`` / cast its weights to
        ``dtype``."""
        if dtype is not None:  # diffusers warns on a .to() that names a dtype, even None
            self.vae.to(dtype=dtype)
        self.vae.to(device=device)
        self.latents_mean = self.latents_mean.to(device=device)
        self.latents_std = self.latents_std.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    # -- coding -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [-1, 1], T = 1 + 4k -> float32 latents [B, 1 + k, z_dim, H/8,
        W/8]."""
        self._check_video(video)
        # diffusers: [B, 3, T, H, W]
        x = video.to(device=self.device, dtype=self.dtype).transpose(1, 2)
        mu = self.vae.encode(x).latent_dist.mean.transpose(1, 2).float()
        return (mu - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, F, z_dim, h, w] -> float32 video [B, 1 + 4(F-1), 3, 8h, 8w] clamped to [-1,
        1]."""
        self._check_latents(latents)
        z = self._denormalise(latents).transpose(1, 2)
        return self.vae.decode(z).sample.transpose(1, 2).float()

    def stream_decoder(self) -> WanStreamDecoder:
        return WanStreamDecoder(self)

    def _denormalise(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, F, C, h, w] -> raw posterior means in the VAE's dtype and
        device."""
        z = latents.to(device=self.device,
                       dtype=torch.float32) * self.latents_std + self.latents_mean
        return z.to(self.dtype)


class WanStreamDecoder(StreamDecoder):
    """Decode a latent stream as it arrives, one latent frame at a time, through the causal feature
    cache.

    The first latent frame of a stream yields 1 video frame, each later one yields
    ``temporal_compression`` (4); pieces may hold any number of latent frames. The cache belongs to
    this object, not to the VAE, so several streams (and one-shot ``Codec.decode`` calls) can
    interleave.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._feat_cache: list[Any] = [None] * self.codec._decoder_convs
        self._started = False
        self._shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, f, z_dim, h, w] (the next f frames) -> video [B, t, 3, 8h, 8w] in [-1, 1]."""
        codec = self.codec
        codec._check_latents(latents)
        b, _, _, h, w = latents.shape
        if self._shape is not None and self._shape != (b, h, w):
            raise InputError(
                f"stream decoder was started with batch/height/width {self._shape}, got "
                f"{(b, h, w)};"
                " call reset() before decoding another stream"
            )
        self._shape = (b, h, w)
        # 1x1x1 conv: per frame
        z = codec.vae.post_quant_conv(codec._denormalise(latents).transpose(1, 2))
        outputs = []
        for i in range(z.shape[2]):
            feat_idx = [0]
            first = not self._started
            out = codec.vae.decoder(z[:, :, i : i + 1], feat_cache=self._feat_cache,
                                    feat_idx=feat_idx, first_chunk=first)
            self._started = True
            outputs.append(out)
        return torch.cat(outputs, dim=2).clamp(-1.0, 1.0).transpose(1, 2).float()


def _load_single_file(path: Path, dtype: torch.dtype, config: dict[str, Any]) -> Any:
    """Original-format (or diffusers-keyed) single-file checkpoint -> AutoencoderKLWan(**config)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for a damaged file
        raise CheckpointError(f"could not read the VAE checkpoint {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if _DIFFUSERS_MARKER_KEY not in state:
        state = convert_wan_vae_to_diffusers(state)
    if _DIFFUSERS_MARKER_KEY not in state or _POST_QUANT_KEY not in state:
        found = list(state)[:_SHOWN_KEYS]
        raise CheckpointError(f"{path} is not a Wan2.1 VAE checkpoint (found keys {found}); "
                              "expected the"
                              " layout of Wan2.1_VAE.pth or of a diffusers AutoencoderKLWan")
    # widths the shapes give (the original release is base_dim 96, z_dim 16; smaller files are test
    # copies)
    config = {"base_dim": int(state[_DIFFUSERS_MARKER_KEY].shape[0]),
              "z_dim": int(state[_POST_QUANT_KEY].shape[0]), **config}
    meta = torch.device("meta")
    with meta:
        vae = AutoencoderKLWan(**config)
    expected = set(vae.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the Wan2.1 VAE: {len(missing)} missing keys (e.g. "
            f"{missing[:_SHOWN_KEYS]}),"
            f" {len(unexpected)} unexpected keys (e.g. {unexpected[:_SHOWN_KEYS]})"
        )
    try:
        vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path} does not fit the Wan2.1 VAE: {err}") from err
    return vae
