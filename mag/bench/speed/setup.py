"""What ``mag bench speed`` streams: its config, the video/latent geometry, the KV-size curve and
the models (trained, or random weights of the preset: speed does not depend on the weights).
Wan-size random models are built on the meta device and materialised on the target device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend

from mag.cache import CachePolicy, retained_bytes
from mag.codecs import get_codec_for
from mag.config import Preset, get_preset, replace_nested
from mag.errors import ConfigError, InputError
from mag.memory import memory_model_mismatch
from mag.models import WanDiT
from mag.pipelines import (
    AVAILABLE_POLICIES,
    MEMORY_MODEL_POLICIES,
    check_policy_name,
    load_any_dit,
)

# Video-frame horizons at which the KV size is reported (issue 6: "from 100 to 10,000 frames").
KV_HORIZONS: tuple[int, ...] = (100, 300, 1000, 3000, 10000)
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# --attention: SDPA backends a run may pin (auto: PyTorch's own choice per call).
ATTENTION_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
CUDA_ONLY_ATTENTION: tuple[str, ...] = ("efficient", "cudnn")
# Timestep scale the few-step list is written in (Self-Forcing: 1000, 750, 500, 250 for 4 steps).
TIMESTEP_SCALE = 1000
# Seeds: the generator, the memory model and the random text context get their own.
MEMORY_SEED_OFFSET = 1
TEXT_SEED_OFFSET = 2
# Presets too large to build on a CPU (1.4B parameters; fp32 would need 5.6 GB and minutes per
# block).
GPU_ONLY_PRESETS: tuple[str, ...] = ("wan-1.3b",)


@dataclass(frozen=True)
class SpeedConfig:
    """What to stream and how.

    Attributes:
        policies: cache policy names (:data:`mag.pipelines.AVAILABLE_POLICIES`). frames: video
        frames of the measured stream (rounded up to whole blocks). warmup_blocks: blocks of a
        separate, unmeasured stream per policy (allocator, kernels, compile). decode: decode every
        block through the preset's codec inside the timed region. compile: ``torch.compile`` mode
        for every transformer block except its cached attention
            (:func:`compile_model`; one of :data:`~mag.models.compile.COMPILE_MODES`), or None:
            eager.
        rounds: measured streams per policy, interleaved across policies (see the module docstring).
        attention: SDPA backend for every attention call (:data:`ATTENTION_BACKENDS`; ``auto`` lets
        PyTorch
            choose, e.g. FlashAttention-2 on H100; ``cudnn`` is cuDNN's fused attention, CUDA only).
        profile_blocks: after the first round's measured stream, profile a stream of this many
        blocks per
            policy with ``torch.profiler`` (0: none); its top operators go to the policy's
            ``profile``.
        seed: noise seed. kv_horizons: video-frame horizons of the ``kv_bytes`` curve.
    """

    policies: tuple[str, ...] = ("full", "window", "mag")
    frames: int = 48
    warmup_blocks: int = 1
    decode: bool = True
    compile: str | None = None
    rounds: int = 1
    attention: str = "auto"
    profile_blocks: int = 0
    seed: int = 0
    kv_horizons: tuple[int, ...] = KV_HORIZONS

    def validate(self) -> SpeedConfig:
        if not self.policies:
            raise ConfigError(f"--policies is empty; give some of {', '.join(AVAILABLE_POLICIES)}")
        for name in self.policies:
            check_policy_name(name)
        if len(set(self.policies)) != len(self.policies):
            raise ConfigError(f"--policies names a policy twice: {','.join(self.policies)}")
        if self.frames < 1:
            raise InputError("--frames must be a positive number of video frames, got "
                             f"{self.frames}")
        if self.warmup_blocks < 0:
            raise InputError(f"--warmup-blocks must be >= 0, got {self.warmup_blocks}")
        if self.rounds < 1:
            raise InputError(f"--rounds must be >= 1, got {self.rounds}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention backend {self.attention!r};"
                              f" valid: {', '.join(ATTENTION_BACKENDS)}")
        if self.profile_blocks < 0:
            raise InputError(f"--profile-blocks must be >= 0, got {self.profile_blocks}")
        if any(h < 1 for h in self.kv_horizons):
            raise InputError("KV horizons must be positive video-frame counts, got "
                             f"{self.kv_horizons}")
        return self


# ---------------------------------------------------------------------------------------------
# Geometry: video frames <-> latent frames <-> blocks


def speed_preset(base: str | Preset, *, steps: int | None = None, height: int | None = None,
                 width: int | None = None, rope_max_positions: int | None = None,
                 cache: Mapping[str, int] | None = None) -> Preset:
    """Preset ``base`` (a registry name, or a loaded model's preset) with the benchmark's overrides.

    ``steps=k`` spaces the few-step list evenly from 1000 down (k=4 gives Self-Forcing's 1000, 750,
    500, 250), before the preset's shift. ``cache``: ``CacheConfig`` fields to override. A loaded
    model's preset keeps its own overrides (video size, camera RoPE) under the ones given here.
    """
    overrides: dict[str, Any] = {}
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be >= 1, got {steps}")
        overrides["scheduler.denoising_steps"] = tuple(
            round(TIMESTEP_SCALE * (steps - i) / steps) for i in range(steps))
    for key, value in (("video.height", height), ("video.width", width),
                       ("dit.rope_max_positions", rope_max_positions),
                       *((f"cache.{field}", value) for field, value in (cache or {}).items())):
        if value is not None:
            overrides[key] = value
    if isinstance(base, str):
        return get_preset(base, **overrides)
    return replace_nested(base, overrides).validate() if overrides else base


def latent_frames_for(preset: Preset, video_frames: int) -> int:
    """Latent frames (whole blocks) needed for at least ``video_frames`` video frames.

    A temporal-compression-k codec gives 1 video frame for the first latent frame and k for each
    later one.
    """
    k = preset.video.temporal_compression
    latent = 1 + math.ceil(max(video_frames - 1, 0) / k)
    block = preset.cache.frames_per_block
    return math.ceil(latent / block) * block


def video_frames_for(preset: Preset, latent_frames: int) -> int:
    """Video frames that ``latent_frames`` latent frames decode to."""
    return 1 + (latent_frames - 1) * preset.video.temporal_compression if latent_frames else 0


# ---------------------------------------------------------------------------------------------
# KV size over long horizons (the cache's own accounting, mag.cache.accounting)


def kv_bytes_curve(policy: CachePolicy, preset: Preset, dtype: torch.dtype,
                   video_horizons: tuple[int, ...] | list[int]) -> list[list[int]]:
    """``[[video_frames, kv_bytes], ...]`` for a stream of each horizon (rounded up to whole
    blocks)."""
    latent = [latent_frames_for(preset, h) for h in video_horizons]
    sizes = retained_bytes(policy, preset, dtype, latent)
    return [[int(h), n] for h, n in zip(video_horizons, sizes, strict=True)]


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class SpeedModels:
    """The generator, the memory model (None unless a memory policy is asked for) and where they
    came from."""

    generator: WanDiT
    memory_model: WanDiT | None
    preset: Preset
    source: dict[str, Any]
    wan_dir: str | None = None  # the Wan2.1 folder whose VAE decodes (else a random VAE)


def random_model(preset: Preset, device: torch.device | str, dtype: torch.dtype,
                 seed: int) -> WanDiT:
    """A random-weights generator built on the meta device and materialised on ``device`` (never on
    the CPU first, so a 1.4B model costs no host memory), in ``dtype`` and eval mode."""
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype).eval().requires_grad_(False)


def build_models(preset_name: str | None, *, model: str | None, memory_model: str | None,
                 policies: tuple[str, ...], device: str, dtype: torch.dtype, seed: int,
                 steps: int | None = None, height: int | None = None, width: int | None = None,
                 rope_max_positions: int | None = None, cache: Mapping[str, int] | None = None,
                 wan_dir: str | None = None) -> SpeedModels:
    """Load ``--model`` / ``--memory-model`` or build random models of ``preset_name``.

    A memory policy with no ``--memory-model`` gets a random memory model of the generator's config
    (its cost is the same as a trained one's).
    """

    source: dict[str, Any] = {"generator": "random weights", "memory_model": None}
    if model is None:
        preset = speed_preset(preset_name or "tiny", steps=steps, height=height, width=width,
                              rope_max_positions=rope_max_positions, cache=cache)
        _check_device(preset, device)
        generator = random_model(preset, device, dtype, seed)
    else:
        if rope_max_positions is not None:
            raise ConfigError("--rope-max-positions sizes the position table of random-weight "
                              "models only;"
                              " a trained model keeps the table it was trained with")
        loaded = load_any_dit(model, wan_dir=wan_dir, device=device)  # any format (mag.weights)
        generator, preset, meta = loaded.model, loaded.preset, loaded.meta
        if preset_name is not None and preset_name != preset.name:
            raise ConfigError(f"--preset {preset_name} does not match the model's preset "
                              f"{preset.name!r};"
                              " drop --preset (the model defines it)")
        preset = speed_preset(preset, steps=steps, height=height, width=width, cache=cache)
        generator = generator.to(dtype).requires_grad_(False)
        source["generator"] = {"model": model, "name": meta.get("name"), "stage": meta.get("stage")}
    memory = None
    if any(p in MEMORY_MODEL_POLICIES for p in policies):
        if memory_model is None:
            memory = random_model(preset, device, dtype, seed + MEMORY_SEED_OFFSET)
            source["memory_model"] = "random weights (same config as the generator)"
        else:
            loaded = load_any_dit(memory_model, stages=("memory",), wan_dir=wan_dir, device=device)
            memory, memory_preset, meta = loaded.model, loaded.preset, loaded.meta
            # The speed run may override the generator's video size, so only the network and block
            # must agree.
            mismatch = memory_model_mismatch(preset, memory_preset, fields=("dit",
                                                                            "cache.frames_per_block"))
            if mismatch is not None:
                raise ConfigError(f"--memory-model {memory_model} does not match the generator in "
                                  f"{mismatch};"
                                  " give the memory model trained for this generator")
            memory = memory.to(dtype).requires_grad_(False)
            source["memory_model"] = {"model": memory_model, "name": meta.get("name")}
    return SpeedModels(generator, memory, preset, source, wan_dir)


def _check_device(preset: Preset, device: str) -> None:
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; run on a GPU machine or "
                          "use --device"
                          " cpu with --preset tiny")
    if device == "cpu" and preset.name in GPU_ONLY_PRESETS:
        raise ConfigError(f"preset {preset.name!r} (1.4B parameters) is benchmarked on a GPU "
                          "only; use"
                          " --device cuda, or --preset tiny on the CPU")


def build_codec(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int,
                wan_dir: str | None = None) -> Any:
    """The preset's codec for decoding in the loop: ``pixel`` as is, ``wan-vae`` from ``wan_dir``
    (the Wan2.1 folder) or with random weights (the same cost)."""

    if preset.video.codec == "pixel":
        return get_codec_for(preset.video)
    if wan_dir is not None:
        return get_codec_for(preset.video, path=wan_dir).to(device=device, dtype=dtype)
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ConfigError("decoding through the wan-vae codec needs diffusers, which does not "
                          "import here"
                          f" ({err}); pass --no-decode to time generation alone") from err
    return get_codec_for(preset.video, config={}, seed=seed).to(device=device, dtype=dtype)
