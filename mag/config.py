"""Typed configs and the preset registry.

Every shape and constant the models, schedulers and pipelines need lives here, so code never
carries magic numbers (tokens per frame, cache sizes) of its own. Presets are frozen dataclasses;
``get_preset(name)`` is the only way in, and an unknown name or an invalid value raises
:class:`ConfigError` with the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mag.errors import ConfigError

__all__ = ["CacheConfig", "ConfigError", "DiTConfig", "Preset", "SchedulerConfig", "VideoConfig",
           "config_differences", "get_preset", "PRESETS", "preset_from_dict", "replace_nested"]


PredictionType = Literal["velocity", "x0"]


@dataclass(frozen=True)
class DiTConfig:
    """Shapes of the Wan2.1-architecture diffusion transformer.

    Attributes:
        in_channels: latent channels in (16 for the Wan VAE, 3 for the pixel codec). out_channels:
        latent channels out. dim: hidden width. ffn_dim: width of the GELU-tanh feed-forward layer.
        num_heads: attention heads; ``dim / num_heads`` is the head width. num_layers: transformer
        blocks. text_dim: width of the text-encoder embeddings fed to cross-attention. freq_dim:
        width of the sinusoidal timestep embedding. patch_size: (frames, height, width) of one
        patch; Wan uses (1, 2, 2). eps: epsilon of the layer norms and RMS norms. qk_norm:
        RMS-normalise queries and keys (Wan: True). cross_attn_norm: affine LayerNorm before
        cross-attention (Wan: True). rope_theta: base of the 3D rotary embedding.
        rope_max_positions: table length of the rotary embedding along each axis. action_dim: width
        of an optional per-frame conditioning vector (camera action); 0 = off. camera_rope:
        camera-anchored RoPE: every forward takes each frame's horizontal camera position
            (``width_offsets``, in patches) and adds it to the RoPE column index, so positions are
            world columns and a revisited view sits at the same width position however long ago it
            was seen. Off for Wan (real video has no camera track); see docs/recall.md.
        prediction: what the network output means. ``velocity`` is Wan's ``v = eps - x0``;
            ``x0`` predicts the clean latent and converts (tiny models learn this far better).
    """

    in_channels: int = 16
    out_channels: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    action_dim: int = 0
    camera_rope: bool = False
    prediction: PredictionType = "velocity"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_numel(self) -> int:
        """Numbers in one patch token before embedding (channels x patch volume)."""
        return self.in_channels * math.prod(self.patch_size)

    def validate(self) -> None:
        _positive(self, "in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers",
                  "text_dim", "freq_dim", "rope_max_positions")
        if self.dim % self.num_heads:
            raise ConfigError(f"dit.dim={self.dim} must be divisible by "
                              f"dit.num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head width dim/num_heads={self.head_dim} must be even and >= 6 "
                              "for 3D RoPE")
        if len(self.patch_size) != 3 or any(p <= 0 for p in self.patch_size):
            raise ConfigError(f"dit.patch_size must be three positive ints, got {self.patch_size}")
        if self.action_dim < 0:
            raise ConfigError(f"dit.action_dim must be >= 0, got {self.action_dim}")
        if self.prediction not in ("velocity", "x0"):
            raise ConfigError(f"dit.prediction must be 'velocity' or 'x0', got {self.prediction!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Flow-matching schedule (Wan convention ``x_s = (1-s) x0 + s eps``, ``t = 1000 s``).

    Attributes:
        num_train_timesteps: timestep scale (1000).
        shift: sampling shift ``s' = shift*s / (1 + (shift-1)*s)``.
        denoising_steps: few-step list before the shift (Self-Forcing: 1000, 750, 500, 250).
        min_timestep / max_timestep: DMD timestep clamp.
    """

    num_train_timesteps: int = 1000
    shift: float = 5.0
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    min_timestep: float = 20.0
    max_timestep: float = 980.0

    def validate(self) -> None:
        if self.shift <= 0:
            raise ConfigError(f"scheduler.shift must be > 0, got {self.shift}")
        if not self.denoising_steps:
            raise ConfigError("scheduler.denoising_steps must not be empty")
        steps = list(self.denoising_steps)
        if any(not 0 < s <= self.num_train_timesteps for s in steps) or steps != sorted(steps,
                                                                                        reverse=True):
            raise ConfigError(
                "scheduler.denoising_steps must be decreasing values in (0, "
                f"{self.num_train_timesteps}],"
                f" got {self.denoising_steps}"
            )
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_train_timesteps:
            raise ConfigError("scheduler needs 0 <= min_timestep < max_timestep <= "
                              "num_train_timesteps")


@dataclass(frozen=True)
class CacheConfig:
    """KV-cache geometry, in latent frames.

    Attributes:
        frames_per_block: latent frames denoised together (bidirectional inside a block).
        sink_frames: first frames of the stream the ``window`` policy keeps forever (LongLive's
        sinks). memory_sink_frames: first frames of the stream the compressed policies
        (``downsample``, ``mag``,
            ``bounded``) keep uncompressed beside one frame per block.
        window_frames: most recent frames the ``window`` policy keeps besides the sinks.
        memory_slots: ring-buffer size (compressed frames) of the ``bounded`` and ``official``
        policies. default_policy: the policy commands use when none is asked for.
        archive_ring_slots: ring of recent compressed frames of the ``archive`` policy.
        archive_retrieval_slots: GPU slots the ``archive`` policy fills, per block, with the
            archived (evicted) compressed frames that best match the block's view.
        archive_host_mib: host memory the archive fills before it spills to disk.
    """

    frames_per_block: int = 3
    sink_frames: int = 3
    memory_sink_frames: int = 3
    window_frames: int = 9
    memory_slots: int = 32
    default_policy: str = "mag"
    archive_ring_slots: int = 4
    archive_retrieval_slots: int = 4
    archive_host_mib: int = 4096

    def validate(self) -> None:
        _positive(self, "frames_per_block", "window_frames", "memory_slots", "archive_ring_slots",
                  "archive_retrieval_slots", "archive_host_mib")
        for name in ("sink_frames", "memory_sink_frames"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cache.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class VideoConfig:
    """Pixel and latent geometry at the preset's default resolution.

    Attributes:
        height, width: decoded video frame size in pixels.
        channels: decoded video channels.
        codec: ``pixel`` (identity latent) or ``wan-vae``.
        spatial_compression / temporal_compression: codec down-sampling factors.
        latent_channels: channels of one latent frame.
        fps: frame rate written to mp4.
    """

    height: int = 480
    width: int = 832
    channels: int = 3
    codec: Literal["pixel", "wan-vae"] = "wan-vae"
    spatial_compression: int = 8
    temporal_compression: int = 4
    latent_channels: int = 16
    fps: int = 16

    @property
    def latent_height(self) -> int:
        return self.height // self.spatial_compression

    @property
    def latent_width(self) -> int:
        return self.width // self.spatial_compression

    def validate(self) -> None:
        _positive(self, "height", "width", "channels", "spatial_compression",
                  "temporal_compression", "latent_channels", "fps")
        if self.codec not in ("pixel", "wan-vae"):
            raise ConfigError(f"video.codec must be 'pixel' or 'wan-vae', got {self.codec!r}")
        if self.height % self.spatial_compression or self.width % self.spatial_compression:
            raise ConfigError(
                f"video size {self.height}x{self.width} must be divisible by the codec's spatial"
                f" compression {self.spatial_compression}"
            )


@dataclass(frozen=True)
class Preset:
    """Everything that fixes a model family: network, schedule, cache, video, text encoder."""

    name: str
    dit: DiTConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text_encoder: Literal["minilm", "umt5"] = "umt5"
    text_max_tokens: int = 512

    @property
    def tokens_per_frame(self) -> int:
        """Transformer tokens of one latent frame at the default resolution."""
        _, ph, pw = self.dit.patch_size
        return (self.video.latent_height // ph) * (self.video.latent_width // pw)

    def validate(self) -> Preset:
        self.dit.validate()
        self.scheduler.validate()
        self.cache.validate()
        self.video.validate()
        if self.text_encoder not in ("minilm", "umt5"):
            raise ConfigError(f"text_encoder must be 'minilm' or 'umt5', got {self.text_encoder!r}")
        if self.dit.in_channels != self.video.latent_channels:
            raise ConfigError(
                f"dit.in_channels={self.dit.in_channels} must equal video.latent_channels"
                f"={self.video.latent_channels}"
            )
        _, ph, pw = self.dit.patch_size
        if self.video.latent_height % ph or self.video.latent_width % pw:
            raise ConfigError(
                f"latent size {self.video.latent_height}x{self.video.latent_width} is not "
                "divisible by"
                f" the patch size {self.dit.patch_size[1:]}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(cfg: object, *names: str) -> None:
    prefix = type(cfg).__name__
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{prefix}.{name} must be a positive number, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Registry

def _tiny() -> Preset:
    return Preset(
        name="tiny",
        dit=DiTConfig(
            in_channels=3, out_channels=3, dim=128, ffn_dim=512, num_heads=4, num_layers=4,
            text_dim=384, freq_dim=64, patch_size=(1, 4, 4), rope_max_positions=4096,
            prediction="x0",
        ),
        scheduler=SchedulerConfig(shift=3.0),
        # 32 compressed frames remember the last 96 frames (every benchmark episode) and fill by
        # frame 99, so the bounded stream's latency is flat from frame 100 on (docs/performance.md).
        cache=CacheConfig(frames_per_block=3, sink_frames=3, window_frames=9, memory_slots=32),
        video=VideoConfig(height=32, width=32, codec="pixel", spatial_compression=1,
                          temporal_compression=1, latent_channels=3, fps=16),
        text_encoder="minilm",
        text_max_tokens=32,
    )


def _wan_1_3b() -> Preset:
    return Preset(
        name="wan-1.3b",
        dit=DiTConfig(),
        scheduler=SchedulerConfig(shift=5.0),
        # LongLive v1 window: 12 frames including 3 sinks. The released MAG's inference geometry
        # (configs/magbench_inference.yaml: sink_size 2, local_attn_size 21) is the default: 2
        # uncompressed sinks + a ring of 21 compressed frames, 23 cached frames in all
        # (docs/real-weights.md).
        cache=CacheConfig(frames_per_block=3, sink_frames=3, window_frames=9, memory_sink_frames=2,
                          memory_slots=21, default_policy="official"),
        video=VideoConfig(),
        text_encoder="umt5",
        text_max_tokens=512,
    )


PRESETS = {"tiny": _tiny, "wan-1.3b": _wan_1_3b}


def lookup(kind: str, registry: dict[str, Any], name: str) -> Any:
    """``registry[name]``, or a ConfigError naming the valid choices of this ``kind`` (codec,
    preset, ...)."""
    if name not in registry:
        raise ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}")
    return registry[name]


def build_registered(kind: str, registry: dict[str, Any], name: str, **kwargs: Any) -> Any:
    """Call the factory ``registry[name](**kwargs)``; bad names or arguments raise ConfigError."""
    factory = lookup(kind, registry, name)
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments for {kind} {name!r}: {err}") from err


def get_preset(name: str, **overrides: Any) -> Preset:
    """Return a validated preset, optionally with top-level fields replaced.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or an invalid value.
    """
    preset = lookup("preset", PRESETS, name)()
    if overrides:
        preset = replace_nested(preset, overrides)
    return preset.validate()


def replace_nested(cfg: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace`` that accepts dotted keys (``"dit.num_layers"``) and nested dicts."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in {f.name for f in dataclasses.fields(cfg)}:
            valid = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ConfigError(f"{type(cfg).__name__} has no field {head!r}; valid fields: {valid}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, head)):
            nested.setdefault(head, {}).update(value)
        else:
            current = getattr(cfg, head)
            direct[head] = (
                tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
            )
    for head, sub in nested.items():
        direct[head] = replace_nested(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct)


def config_differences(a: Any, b: Any, limit: int = 4) -> str:
    """``"field: a vs b, ..."`` over the first ``limit`` top-level fields where dataclasses ``a``
    and ``b`` differ (plain values: ``"a vs b"``); ``""`` when they are equal. For error
    messages."""
    if not (dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b)):
        return "" if a == b else f"{a} vs {b}"
    left, right = a.__dict__, b.__dict__
    differing = [f"{k}: {left[k]} vs {right.get(k)}" for k in left if left[k] != right.get(k)]
    return ", ".join(differing[:limit])


def preset_from_dict(data: dict[str, Any]) -> Preset:
    """Rebuild a preset from ``Preset.to_dict()`` output (e.g. checkpoint metadata)."""
    name = data.get("name")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    overrides = {k: v for k, v in data.items() if k != "name"}
    return get_preset(name, **overrides)
