"""``MagPipeline``: downloaded weights in, frames out as they stream (the Python face of ``mag
generate``).

    pipe = MagPipeline.from_pretrained("MAG/generator", wan_dir="Wan2.1-T2V-1.3B",
                                       memory_weights="MAG/memory", device="cuda",
                                       dtype=torch.bfloat16)
    for frame in pipe.stream("a corgi running on a beach", seconds=30):  # uint8 [H, W, 3], as
    decoded
        ...

Weights may be in any format :func:`mag.weights.detect_source` knows, or a mag model file / shipped
name. Wan-scale weights take their text encoder (UMT5 ``.pth`` + tokenizer) and VAE from
``wan_dir``. Latent blocks are decoded as they arrive by the codec's streaming decoder, which equals
the whole-video decode (tests/test_codecs.py): every decoded frame is yielded, ``1 + 4 (F - 1)`` for
``F`` latent frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mag.cache import MagPolicy, kv_bytes_per_frame
from mag.codecs import Codec, get_codec_for, tensor_to_frames
from mag.config import Preset, replace_nested
from mag.errors import ConfigError, InputError
from mag.models import WanDiT
from mag.pipelines.streaming import SamplerConfig, StreamingGenerator
from mag.pipelines.writers import check_policy_name, policy_from_name, writer_for
from mag.registry import GENERATOR_STAGES, load_model
from mag.text import PromptEmbeddingCache, get_text_encoder
from mag.weights import detect_source, read_external_dit
from mag.weights.model import build_dit, preset_for

__all__ = ["LoadedDiT", "MagPipeline", "latent_frames_for_seconds", "load_any_dit"]

MEMORY_STAGE = "memory"
# Preset fields a stream may change for a model file (video size, cache geometry), never the
# network's.
RUNTIME_FIELDS = ("video.", "cache.")
# Text-encoder mode when a model file does not say: the tiny recipes use pooled MiniLM, Wan
# per-token UMT5.
DEFAULT_TEXT_MODES = {"minilm": "pooled", "umt5": "tokens"}


@dataclass(frozen=True)
class LoadedDiT:
    """A network with its preset and what its file said (``source_format``: the detected format)."""

    model: WanDiT
    preset: Preset
    meta: dict[str, Any]


def load_any_dit(path: str | Path, *, stages: tuple[str, ...] = GENERATOR_STAGES,
                 wan_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, **preset_overrides: Any) -> LoadedDiT:
    """Load a DiT from a shipped name, a mag model file, or any upstream format (module docstring).

    ``stages`` guards mag model files against the wrong slot (an upstream folder does not say
    whether it is a generator or a memory model). ``preset_overrides`` (dotted, e.g.
    ``video.height``) apply to upstream weights, whose preset is ``wan-1.3b`` with the network
    shapes of the weights.
    """
    name = str(path)
    if not Path(name).exists() or detect_source(name).kind == "mag-model":
        model, preset, meta = load_model(name, device=device, expect_stage=stages)
        fixed = sorted(k for k in preset_overrides if not k.startswith(RUNTIME_FIELDS))
        if fixed:
            raise ConfigError(f"{name} is a mag model file: its network is fixed ({fixed} cannot "
                              "change;"
                              f" only {', '.join(RUNTIME_FIELDS)}* can)")
        preset = replace_nested(preset, preset_overrides).validate() if preset_overrides else preset
        return LoadedDiT(model.to(dtype=dtype) if dtype is not None else model, preset,
                         {**meta, "source_format": "mag-model"})
    shapes_from = detect_source(wan_dir) if wan_dir is not None else None
    weights = read_external_dit(name, shapes_from=shapes_from)
    preset = preset_for(weights, **preset_overrides)
    model = build_dit(weights, preset, device=device, dtype=dtype)
    return LoadedDiT(model, preset, {"name": name, "stage": None,
                                     "source_format": weights.source.kind,
                                     "preset": preset.to_dict()})


def latent_frames_for_seconds(preset: Preset, seconds: float) -> int:
    """Latent frames (whole blocks) for ``seconds`` of video at the preset's fps (30 s at Wan:
    120)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"seconds must be a positive number, got {seconds}")
    video = preset.video
    latent = math.ceil(seconds * video.fps / video.temporal_compression)
    block = preset.cache.frames_per_block
    return block * math.ceil(latent / block)


class MagPipeline:
    """A generator, its memory model, text encoder and codec under one cache policy; see the module
    docstring.

    Attributes:
        preset: the generator's preset (network shapes, cache geometry, video size). policy_name:
        the cache policy streams run under (default: the preset's ``cache.default_policy``).
    """

    def __init__(self, generator: LoadedDiT, text: PromptEmbeddingCache, codec: Codec, *,
                 memory: WanDiT | None = None, policy: str | None = None,
                 sampler: SamplerConfig | None = None) -> None:
        self.generator = generator
        self.preset = generator.preset
        self.text = text
        self.codec = codec
        self.memory = memory
        self.policy_name = check_policy_name(policy or self.preset.cache.default_policy,
                                             has_memory_model=memory is not None)
        self.sampler = (sampler or SamplerConfig()).validate()

    @classmethod
    def from_pretrained(cls, weights: str | Path, *, wan_dir: str | Path | None = None,
                        memory_weights: str | Path | None = None, policy: str | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        sampler: SamplerConfig | None = None,
                        **preset_overrides: Any) -> MagPipeline:
        """Load everything a stream needs (see the module docstring); ``dtype`` applies to every
        model."""
        generator = load_any_dit(weights, wan_dir=wan_dir, device=device, dtype=dtype,
                                 **preset_overrides)
        preset = generator.preset
        memory = None
        if memory_weights is not None:
            loaded = load_any_dit(memory_weights, stages=(MEMORY_STAGE,), wan_dir=wan_dir,
                                  device=device, dtype=dtype, **preset_overrides)
            _check_same_network(preset, loaded.preset)
            memory = loaded.model
        text = _text_encoder(generator, wan_dir, device, dtype)
        codec = _codec(preset, wan_dir).to(device=device, dtype=dtype)
        return cls(generator, text, codec, memory=memory, policy=policy, sampler=sampler)

    @property
    def device(self) -> torch.device:
        return self.generator.model.patch_embedding.weight.device

    def encode(self, prompts: list[str]) -> Tensor:
        """``[B, L, text_dim]`` prompt embeddings on the generator's device and dtype."""
        weight = self.generator.model.patch_embedding.weight
        return self.text.get(prompts).to(device=weight.device, dtype=weight.dtype)

    # as a decorator: grad mode is set per step of the generator, never left behind
    @torch.no_grad()
    def stream(self, prompt: str, *, seconds: float | None = None, latent_frames: int | None = None,
               seed: int = 0) -> Iterator[np.ndarray]:
        """Yield the video's frames (uint8 ``[H, W, 3]``) as each block is generated and decoded.

        Give ``seconds`` (at the preset's fps) or ``latent_frames`` (rounded up to whole blocks).
        """
        if (seconds is None) == (latent_frames is None):
            raise InputError("give exactly one of seconds or latent_frames")
        block = self.preset.cache.frames_per_block
        if latent_frames is None:
            latent_frames = latent_frames_for_seconds(self.preset, float(seconds))
        if latent_frames < 1:
            raise InputError(f"latent_frames must be >= 1, got {latent_frames}")
        horizon = block * math.ceil(latent_frames / block)
        gen = self.streaming_generator()
        gen.reset(1, horizon)
        gen.set_prompt(self.encode([prompt]))
        noise = torch.Generator(device=self.device).manual_seed(seed)
        decoder = self.codec.stream_decoder()
        for _ in range(0, horizon, block):
            yield from tensor_to_frames(decoder.decode(gen.generate_block(noise))[0])

    def streaming_generator(self) -> StreamingGenerator:
        """A fresh :class:`StreamingGenerator` under this pipeline's policy, sampler and memory
        model."""
        policy = policy_from_name(self.policy_name, self.preset)
        empty = self.encode([""]) if isinstance(policy, MagPolicy) else None
        writer = writer_for(policy, memory_model=self.memory, empty_context=empty)
        return StreamingGenerator.for_preset(self.generator.model, self.preset, policy,
                                             sampler=self.sampler, writer=writer)

    def memory_plan(self, latent_frames: int) -> dict[str, int]:
        """Bytes the stream needs besides activations: each model's weights and the KV cache it
        allocates."""
        networks = {"generator": self.generator.model, "memory_model": self.memory}
        plan = {name: sum(p.numel() * p.element_size() for p in m.parameters())
                for name, m in networks.items() if m is not None}
        plan["codec"] = self.codec.parameter_bytes()
        plan["text_encoder"] = self.text.encoder.parameter_bytes()
        plan["kv_cache"] = self.kv_cache_bytes(latent_frames)
        return plan

    def kv_cache_bytes(self, latent_frames: int) -> int:
        """Bytes the KV cache allocates for a stream of ``latent_frames``, from the policy's
        capacity and the cache's per-frame size (nothing is allocated)."""
        policy = policy_from_name(self.policy_name, self.preset)
        block = self.preset.cache.frames_per_block
        horizon = block * math.ceil(latent_frames / block)
        dtype = self.generator.model.patch_embedding.weight.dtype
        per_frame = kv_bytes_per_frame(self.preset.dit, self.preset.tokens_per_frame, dtype)
        caches = 2 if self.sampler.uses_guidance else 1  # guidance keeps an unconditional cache too
        return caches * policy.capacity_frames(horizon, block) * per_frame


def _check_same_network(generator: Preset, memory: Preset) -> None:
    if generator.dit != memory.dit:
        found = (memory.dit.dim, memory.dit.num_layers)
        raise ConfigError(f"the memory model's network (width, layers) {found} differs from the "
                          "generator's"
                          f" {(generator.dit.dim, generator.dit.num_layers)}; a memory model must "
                          "share the"
                          " generator's architecture")


def _text_encoder(generator: LoadedDiT, wan_dir: str | Path | None, device: torch.device | str,
                  dtype: torch.dtype | None) -> PromptEmbeddingCache:
    preset = generator.preset
    if preset.text_encoder == "umt5":
        if wan_dir is None:
            raise ConfigError("Wan-scale weights need the Wan2.1 folder for the UMT5 text encoder "
                              "and the"
                              " VAE: pass wan_dir (--wan-dir) = the downloaded Wan2.1-T2V-1.3B "
                              "folder")
        encoder = get_text_encoder("umt5", path=wan_dir, max_tokens=preset.text_max_tokens)
        return PromptEmbeddingCache(encoder.to(device=device, dtype=dtype))
    recipe = generator.meta.get("recipe") if isinstance(generator.meta.get("recipe"), dict) else {}
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    mode = data.get("text_mode", DEFAULT_TEXT_MODES[preset.text_encoder])
    return PromptEmbeddingCache(get_text_encoder(preset.text_encoder, mode=mode))


def _codec(preset: Preset, wan_dir: str | Path | None) -> Codec:
    if preset.video.codec == "wan-vae":
        if wan_dir is None:
            raise ConfigError("Wan-scale weights need the Wan2.1 folder for the VAE: pass wan_dir"
                              " (--wan-dir)")
        return get_codec_for(preset.video, path=wan_dir)
    return get_codec_for(preset.video)
