"""``mag bench speed``: frames/s, per-block latency, peak memory and KV-cache size of streaming generation.

What is measured, per cache policy (full, window, downsample, mag, bounded):

- ``fps``: video frames per second of a REAL stream of ``--frames`` video frames (rounded up to whole
  blocks), wall time of every block = its few-step denoise + its cache write pass (the generator's, or
  the memory model's under ``mag`` / ``bounded``) + its streaming decode through the preset's codec
  (unless ``--no-decode``). On CUDA every block ends with a device synchronise, so the time is real.
- ``latency_ms_p50`` / ``latency_ms_p95``: percentiles of those per-block wall times.
- ``--rounds N``: every policy streams N times, the policies interleaved and their order rotated each round,
  so slow phases of a shared machine (or a GPU's clocks) hit every policy alike. ``fps`` is then the
  median over rounds (``fps_rounds`` lists them), latency percentiles pool every round's blocks,
  ``latency_ms_blocks`` is the per-block median over rounds, and ``fps_over_window`` is the median of
  the per-round ratios to the ``window`` policy's fps in the same round.
- ``peak_memory_bytes``: CUDA: ``torch.cuda.max_memory_allocated`` during the measured stream (weights
  included). CPU: the growth of the process's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each policy) over the resident set at the start of the stream.
- ``kv_bytes``: ``[[video_frames, bytes], ...]``: bytes of the K/V the policy keeps after a stream of that
  many video frames. Computed, not streamed: the policy's own write plans are replayed on the host for
  every block (``mag.cache.PlanReplay``), times the bytes of one cached frame, so horizons of 10,000 frames
  cost nothing. ``kv_bytes_streamed`` is the real cache's ``nbytes`` after the measured stream, and equals
  the replay at that horizon (tested).

The text encoder is not run: it runs once per prompt, outside the block loop, so a fixed random context of
the preset's text shape ``[1, text_max_tokens, text_dim]`` stands in for it. Without ``--model`` the
generator (and the memory model) have random weights: speed does not depend on the weights. Wan-size
models are built on the meta device and materialised directly on the target device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mag.bench.common import add_memory_cache_arguments, synchronize
from mag.cache import CachePolicy, KVCache, retained_bytes
from mag.config import Preset, get_preset, replace_nested
from mag.errors import ConfigError, InputError
from mag.models import WanDiT
from mag.models.compile import COMPILE_MODES, CompiledModules, compile_failure, compile_model, compile_scope
from mag.pipelines.streaming import (
    AVAILABLE_POLICIES,
    MEMORY_MODEL_POLICIES,
    StreamingGenerator,
    check_policy_name,
    policy_from_name,
    writer_for,
)

__all__ = ["DTYPES", "KV_HORIZONS", "SpeedConfig", "SpeedModels", "add_speed_arguments", "build_models",
           "kv_bytes_curve", "run_speed", "run_speed_cli", "speed_preset", "stream_blocks",
           "write_plot"]

# Video-frame horizons at which the KV size is reported (issue 6: "from 100 to 10,000 frames").
KV_HORIZONS: tuple[int, ...] = (100, 300, 1000, 3000, 10000)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# Percentiles of the per-block latency in the report.
P50, P95 = 50.0, 95.0
MS_PER_S = 1000.0
US_PER_MS = 1000.0
PROFILE_ROWS = 15  # operators kept per profiled policy
# --attention: SDPA backends a run may pin (auto: PyTorch's own choice per call).
ATTENTION_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
CUDA_ONLY_ATTENTION: tuple[str, ...] = ("efficient", "cudnn")
PAN_PATCHES_PER_FRAME = 1.0  # camera-anchored models: the steady pan the stream is told about
# Timestep scale the few-step list is written in (Self-Forcing: 1000, 750, 500, 250 for 4 steps).
TIMESTEP_SCALE = 1000
# Seeds: the generator, the memory model and the random text context get their own.
MEMORY_SEED_OFFSET = 1
TEXT_SEED_OFFSET = 2
# Presets too large to build on a CPU (1.4B parameters; fp32 would need 5.6 GB and minutes per block).
GPU_ONLY_PRESETS: tuple[str, ...] = ("wan-1.3b",)
# Linux: writing this to /proc/self/clear_refs resets the resident-set high-water mark (VmHWM).
CLEAR_REFS_RESET_PEAK = "5"
KIB = 1024
PLOT_DPI = 120


@dataclass(frozen=True)
class SpeedConfig:
    """What to stream and how.

    Attributes:
        policies: cache policy names (:data:`mag.pipelines.streaming.AVAILABLE_POLICIES`).
        frames: video frames of the measured stream (rounded up to whole blocks).
        warmup_blocks: blocks of a separate, unmeasured stream per policy (allocator, kernels, compile).
        decode: decode every block through the preset's codec inside the timed region.
        compile: ``torch.compile`` mode for every transformer block except its cached attention
            (:func:`compile_model`; one of :data:`~mag.models.compile.COMPILE_MODES`), or None: eager.
        rounds: measured streams per policy, interleaved across policies (see the module docstring).
        attention: SDPA backend for every attention call (:data:`ATTENTION_BACKENDS`; ``auto`` lets PyTorch
            choose, e.g. FlashAttention-2 on H100; ``cudnn`` is cuDNN's fused attention, CUDA only).
        profile_blocks: after the first round's measured stream, profile a stream of this many blocks per
            policy with ``torch.profiler`` (0: none); its top operators go to the policy's ``profile``.
        seed: noise seed.
        kv_horizons: video-frame horizons of the ``kv_bytes`` curve.
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
            raise InputError(f"--frames must be a positive number of video frames, got {self.frames}")
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
            raise InputError(f"KV horizons must be positive video-frame counts, got {self.kv_horizons}")
        return self


# ---------------------------------------------------------------------------------------------
# Geometry: video frames <-> latent frames <-> blocks


def speed_preset(base: str | Preset, *, steps: int | None = None, height: int | None = None,
                 width: int | None = None, rope_max_positions: int | None = None,
                 memory_sink_frames: int | None = None, memory_slots: int | None = None) -> Preset:
    """Preset ``base`` (a registry name, or a loaded model's preset) with the benchmark's overrides.

    ``steps=k`` spaces the few-step list evenly from 1000 down (k=4 gives Self-Forcing's 1000, 750, 500, 250),
    before the preset's shift. A loaded model's preset keeps its own overrides (video size, camera RoPE)
    under the ones given here.
    """
    overrides: dict[str, Any] = {}
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be >= 1, got {steps}")
        overrides["scheduler.denoising_steps"] = tuple(
            round(TIMESTEP_SCALE * (steps - i) / steps) for i in range(steps))
    for key, value in (("video.height", height), ("video.width", width),
                       ("dit.rope_max_positions", rope_max_positions),
                       ("cache.memory_sink_frames", memory_sink_frames),
                       ("cache.memory_slots", memory_slots)):
        if value is not None:
            overrides[key] = value
    if isinstance(base, str):
        return get_preset(base, **overrides)
    return replace_nested(base, overrides).validate() if overrides else base


def latent_frames_for(preset: Preset, video_frames: int) -> int:
    """Latent frames (whole blocks) needed for at least ``video_frames`` video frames.

    A temporal-compression-k codec gives 1 video frame for the first latent frame and k for each later one.
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
    """``[[video_frames, kv_bytes], ...]`` for a stream of each horizon (rounded up to whole blocks)."""
    latent = [latent_frames_for(preset, h) for h in video_horizons]
    sizes = retained_bytes(policy, preset, dtype, latent)
    return [[int(h), n] for h, n in zip(video_horizons, sizes, strict=True)]


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class SpeedModels:
    """The generator, the memory model (None unless a memory policy is asked for) and where they came from."""

    generator: WanDiT
    memory_model: WanDiT | None
    preset: Preset
    source: dict[str, Any]


def random_model(preset: Preset, device: torch.device | str, dtype: torch.dtype, seed: int) -> WanDiT:
    """A random-weights generator built on the meta device and materialised on ``device`` (never on the CPU
    first, so a 1.4B model costs no host memory), in ``dtype`` and eval mode."""
    with torch.device("meta"):
        model = WanDiT(preset.dit)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype).eval().requires_grad_(False)


def build_models(preset_name: str | None, *, model: str | None, memory_model: str | None,
                 policies: tuple[str, ...], device: str, dtype: torch.dtype, seed: int,
                 steps: int | None = None, height: int | None = None, width: int | None = None,
                 rope_max_positions: int | None = None, memory_sink_frames: int | None = None,
                 memory_slots: int | None = None) -> SpeedModels:
    """Load ``--model`` / ``--memory-model`` or build random models of ``preset_name``.

    A memory policy with no ``--memory-model`` gets a random memory model of the generator's config (its cost
    is the same as a trained one's).
    """
    from mag.memory import load_memory_model, memory_model_mismatch
    from mag.pipelines import load_generator

    source: dict[str, Any] = {"generator": "random weights", "memory_model": None}
    if model is None:
        preset = speed_preset(preset_name or "tiny", steps=steps, height=height, width=width,
                              rope_max_positions=rope_max_positions, memory_sink_frames=memory_sink_frames,
                              memory_slots=memory_slots)
        _check_device(preset, device)
        generator = random_model(preset, device, dtype, seed)
    else:
        if rope_max_positions is not None:
            raise ConfigError("--rope-max-positions sizes the position table of random-weight models only;"
                              " a trained model keeps the table it was trained with")
        generator, preset, meta = load_generator(model, device=device)
        if preset_name is not None and preset_name != preset.name:
            raise ConfigError(f"--preset {preset_name} does not match the model's preset {preset.name!r};"
                              " drop --preset (the model defines it)")
        preset = speed_preset(preset, steps=steps, height=height, width=width,
                              memory_sink_frames=memory_sink_frames, memory_slots=memory_slots)
        generator = generator.to(dtype).requires_grad_(False)
        source["generator"] = {"model": model, "name": meta.get("name"), "stage": meta.get("stage")}
    memory = None
    if any(p in MEMORY_MODEL_POLICIES for p in policies):
        if memory_model is None:
            memory = random_model(preset, device, dtype, seed + MEMORY_SEED_OFFSET)
            source["memory_model"] = "random weights (same config as the generator)"
        else:
            memory, memory_preset, meta = load_memory_model(memory_model, device=device)
            # The speed run may override the generator's video size, so only the network and block must agree.
            mismatch = memory_model_mismatch(preset, memory_preset, fields=("dit", "cache.frames_per_block"))
            if mismatch is not None:
                raise ConfigError(f"--memory-model {memory_model} does not match the generator in {mismatch};"
                                  " give the memory model trained for this generator")
            memory = memory.to(dtype).requires_grad_(False)
            source["memory_model"] = {"model": memory_model, "name": meta.get("name")}
    return SpeedModels(generator, memory, preset, source)


def _check_device(preset: Preset, device: str) -> None:
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; run on a GPU machine or use --device"
                          " cpu with --preset tiny")
    if device == "cpu" and preset.name in GPU_ONLY_PRESETS:
        raise ConfigError(f"preset {preset.name!r} (1.4B parameters) is benchmarked on a GPU only; use"
                          " --device cuda, or --preset tiny on the CPU")


# ---------------------------------------------------------------------------------------------
# Streaming


class _PeakMemory:
    """Peak memory of a region: CUDA max allocated, or the CPU resident-set high-water-mark growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ("cuda max_memory_allocated (weights included)" if device.type == "cuda" else
                       "cpu VmHWM growth over VmRSS at the stream start (clear_refs reset)")
        self._start = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if not _reset_rss_peak():
            self.method = "cpu ru_maxrss growth (VmHWM reset unavailable: a lower bound)"
            self._start = _ru_maxrss()
        else:
            self._start = _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method.startswith("cpu ru_maxrss"):
            return max(_ru_maxrss() - self._start, 0)
        return max(_proc_status_bytes("VmHWM") - self._start, 0)


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text(CLEAR_REFS_RESET_PEAK)
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") > 0


def _proc_status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KIB
    except OSError:
        return 0
    return 0


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def stream_blocks(gen: StreamingGenerator, context: torch.Tensor, num_blocks: int, *, codec: Any | None,
                  generator: torch.Generator | None) -> tuple[list[float], int]:
    """Stream ``num_blocks`` blocks from a fresh stream; ``(per-block wall seconds, video frames made)``.

    Each block's time covers the denoise, the cache write and (with ``codec``) the streaming decode,
    closed by a device synchronise.
    """
    block = gen.frames_per_block
    gen.reset(batch_size=1, horizon_frames=num_blocks * block)
    gen.set_prompt(context)
    decoder = codec.stream_decoder() if codec is not None else None
    device = gen.device
    # A camera-anchored model is told where the camera looks: a steady pan of one patch per frame.
    pan = (torch.arange(num_blocks * block, dtype=torch.float32, device=device)[None] * PAN_PATCHES_PER_FRAME
           if gen.model.cfg.camera_rope else None)
    synchronize(device)
    seconds: list[float] = []
    video_frames = 0
    for index in range(num_blocks):
        start = time.perf_counter()
        offsets = None if pan is None else pan[:, index * block:(index + 1) * block]
        latents = gen.generate_block(generator, offsets)
        if decoder is not None:
            video_frames += decoder.decode(latents).shape[1]
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    if decoder is None:
        video_frames = video_frames_for(gen.preset, num_blocks * block)
    return seconds, video_frames


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def profile_stream(gen: StreamingGenerator, context: torch.Tensor, num_blocks: int, *, codec: Any | None,
                   generator: torch.Generator | None, rows: int = PROFILE_ROWS) -> dict[str, Any]:
    """Top operators by self time (device time on CUDA, CPU time otherwise) of one profiled stream."""
    from torch.profiler import ProfilerActivity, profile

    cuda = gen.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        stream_blocks(gen, context, num_blocks, codec=codec, generator=generator)
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, field, 0) > 0]
    total = sum(getattr(e, field) for e in events)
    top = sorted(events, key=lambda e: getattr(e, field), reverse=True)[:rows]
    return {
        "blocks": num_blocks,
        "time": "self device time" if cuda else "self CPU time",
        "total_ms": total / US_PER_MS,
        "ops": [{"op": e.key, "self_ms": getattr(e, field) / US_PER_MS, "share": getattr(e, field) / total,
                 "calls": e.count} for e in top],
    }


def run_policy(name: str, models: SpeedModels, codec: Any | None, config: SpeedConfig, device: torch.device,
               context: torch.Tensor, empty_context: torch.Tensor,
               profile_blocks: int = 0) -> tuple[dict[str, Any], KVCache]:
    """Warm up, then stream ``config.frames`` video frames under policy ``name``; the policy's report.

    With ``profile_blocks``, one more stream of that many blocks runs under the profiler (``profile``)."""
    preset = models.preset
    policy = policy_from_name(name, preset)
    writer = writer_for(policy, memory_model=models.memory_model, empty_context=empty_context)
    gen = StreamingGenerator.for_preset(models.generator, preset, policy, writer=writer)
    blocks = latent_frames_for(preset, config.frames) // preset.cache.frames_per_block
    noise = torch.Generator(device=device).manual_seed(config.seed)
    if config.warmup_blocks:
        stream_blocks(gen, context, config.warmup_blocks, codec=codec, generator=noise)
    memory = _PeakMemory(device)
    memory.start()
    seconds, video_frames = stream_blocks(gen, context, blocks, codec=codec, generator=noise)
    cache = gen.cache
    assert cache is not None  # set by stream_blocks
    horizons = sorted(set(config.kv_horizons) | {video_frames})
    row = {
        "fps": video_frames / sum(seconds),
        "seconds": sum(seconds),
        "blocks": blocks,
        "latent_frames": blocks * preset.cache.frames_per_block,
        "video_frames": video_frames,
        "peak_memory_bytes": memory.peak(),
        "peak_memory_method": memory.method,
        "kv_bytes": kv_bytes_curve(policy, preset, cache.k.dtype, horizons),
        "kv_bytes_streamed": cache.nbytes,
        "kv_capacity_bytes_streamed": cache.capacity_bytes,
        "kv_bytes_per_frame": cache.bytes_per_frame,
        "latency_ms_blocks": [s * MS_PER_S for s in seconds],
    }
    if profile_blocks:
        row["profile"] = profile_stream(gen, context, profile_blocks, codec=codec, generator=noise)
    return row, cache


def merge_rounds(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One row per policy from its rounds' rows (see the module docstring), with ``fps_over_window``."""
    merged: dict[str, dict[str, Any]] = {}
    for name, rows in rounds.items():
        if not rows:
            continue
        pooled = [ms for row in rows for ms in row["latency_ms_blocks"]]
        blocks = zip(*(row["latency_ms_blocks"] for row in rows), strict=True)
        per_block = [statistics.median(ms) for ms in blocks]
        merged[name] = {
            **rows[0],
            "fps": statistics.median(row["fps"] for row in rows),
            "fps_rounds": [row["fps"] for row in rows],
            "seconds": statistics.median(row["seconds"] for row in rows),
            "latency_ms_p50": _percentile(pooled, P50),
            "latency_ms_p95": _percentile(pooled, P95),
            "latency_ms_mean": statistics.fmean(pooled),
            "latency_ms_first": per_block[0],
            "latency_ms_last": per_block[-1],
            "latency_ms_blocks": per_block,
            "peak_memory_bytes": max(row["peak_memory_bytes"] for row in rows),
        }
    window = rounds.get("window", [])
    for name, row in merged.items():
        paired = list(zip(rounds[name], window, strict=False))
        if paired:
            row["fps_over_window"] = statistics.median(mine["fps"] / ref["fps"] for mine, ref in paired)
    return merged


def build_codec(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """The preset's codec for decoding in the loop: ``pixel`` as is, ``wan-vae`` with random weights."""
    from mag.codecs import get_codec_for

    if preset.video.codec == "pixel":
        return get_codec_for(preset.video)
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"decoding through the wan-vae codec needs diffusers, which does not import here"
                          f" ({err}); pass --no-decode to time generation alone") from err
    return get_codec_for(preset.video, config={}, seed=seed).to(device=device, dtype=dtype)


def run_speed(models: SpeedModels, config: SpeedConfig, *, device: str, json_path: Path,
              metadata: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Benchmark every policy of ``config`` and write ``json_path`` after each one (a killed run keeps what
    finished) and the plot next to it at the end. Returns the report."""
    config.validate()
    dev = torch.device(device)
    preset = models.preset
    dtype = models.generator.patch_embedding.weight.dtype
    codec = build_codec(preset, dev, dtype, config.seed) if config.decode else None
    text_gen = torch.Generator().manual_seed(config.seed + TEXT_SEED_OFFSET)
    text_shape = (1, preset.text_max_tokens, preset.dit.text_dim)
    context = torch.randn(text_shape, generator=text_gen).to(dev, dtype)
    empty_context = torch.randn(text_shape, generator=text_gen).to(dev, dtype)
    compile_info: dict[str, Any] = {"requested": config.compile is not None, "used": False}
    compiled: list[CompiledModules] = []
    if config.compile is not None:
        compiled = [compile_model(m, mode=config.compile) for m in (models.generator, models.memory_model)
                    if m is not None]
        compile_info.update(used=True, mode=config.compile, scope=compile_scope(config.compile))
    warmup = max(config.warmup_blocks, 1) if config.compile is not None else config.warmup_blocks
    config = dataclasses.replace(config, warmup_blocks=warmup)
    report: dict[str, Any] = {
        **metadata,
        "preset": preset.name,
        "video": {"height": preset.video.height, "width": preset.video.width, "codec": preset.video.codec,
                  "decode": config.decode, "latent_shape": [preset.video.latent_channels,
                                                            preset.video.latent_height,
                                                            preset.video.latent_width]},
        "tokens_per_frame": preset.tokens_per_frame,
        "frames_per_block": preset.cache.frames_per_block,
        "steps": len(preset.scheduler.denoising_steps),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "frames_requested": config.frames,
        "warmup_blocks": warmup,
        "seed": config.seed,
        "compile": compile_info,
        "attention": config.attention,
        "models": models.source,
        "text": {"encoder": None, "context": f"fixed random {list(text_shape)} (the text encoder runs once"
                                             " per prompt, outside the block loop; not timed)"},
        "cache": dataclasses.asdict(preset.cache),
        "policies": {},
    }
    def measure(name: str, profile_blocks: int) -> dict[str, Any]:
        nonlocal compiled
        try:
            row, cache = run_policy(name, models, codec, config, dev, context, empty_context, profile_blocks)
        except Exception as err:  # compile errors surface on the first forward: fall back once to eager
            if not compiled or isinstance(err, (ConfigError, InputError)):
                raise
            for c in compiled:
                c.restore()
            compiled = []
            compile_info.update(used=False, error=f"{type(err).__name__}: {err}"[:2000])
            print(f"mag: torch.compile failed ({compile_failure(err)}); continuing without compile (recorded"
                  " in the JSON)", file=sys.stderr, flush=True)
            row, cache = run_policy(name, models, codec, config, dev, context, empty_context, profile_blocks)
        del cache
        return row

    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in config.policies}
    backend = ATTENTION_BACKENDS[config.attention]
    for round_index in range(config.rounds):
        shift = round_index % len(config.policies)
        for name in config.policies[shift:] + config.policies[:shift]:
            if progress:
                print(f"[{time.strftime('%H:%M:%S')}] {name} (round {round_index + 1}/{config.rounds}):"
                      f" warmup {warmup} blocks, then {config.frames} video frames",
                      file=sys.stderr, flush=True)
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                row = measure(name, config.profile_blocks if round_index == 0 else 0)
            rounds[name].append(row)
            if progress:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {row['fps']:.2f} fps,"
                      f" p50 {_percentile(row['latency_ms_blocks'], P50):.1f} ms,"
                      f" peak {row['peak_memory_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            report["policies"] = merge_rounds(rounds)
            _write_json(json_path, report)
    report["plot"] = write_plot(report, json_path.with_suffix(".png")).name
    _write_json(json_path, report)
    return report


def _write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """PNG: fps per policy (bars) and KV bytes vs video frames per policy (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["policies"]
    names = list(rows)
    fig, (ax_fps, ax_kv) = plt.subplots(1, 2, figsize=(11, 4))
    ax_fps.bar(names, [rows[n]["fps"] for n in names], color="tab:blue")
    ax_fps.set_yscale("log")
    ax_fps.set_ylabel("video frames / s")
    compiled = " + compile" if report["compile"]["used"] else ""
    ax_fps.set_title(f"{report['preset']} {report['device']} {report['dtype']}{compiled}")
    for i, n in enumerate(names):
        ax_fps.annotate(f"{rows[n]['fps']:.1f}", (i, rows[n]["fps"]), ha="center", va="bottom")
    for n in names:
        frames, nbytes = zip(*rows[n]["kv_bytes"], strict=True)
        ax_kv.plot(frames, nbytes, marker="o", label=n)
    ax_kv.set_xscale("log")
    ax_kv.set_yscale("log")
    ax_kv.set_xlabel("video frames streamed")
    ax_kv.set_ylabel("KV cache bytes")
    ax_kv.set_title("KV cache size as the stream grows")
    ax_kv.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line (registered by mag.bench.cli)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mag bench speed``."""
    parser.add_argument("--preset", default=None,
                        help="tiny or wan-1.3b (default tiny; with --model: its preset)")
    parser.add_argument("--policies", default="full,window,mag",
                        help=f"comma-separated cache policies ({', '.join(AVAILABLE_POLICIES)})")
    parser.add_argument("--frames", type=int, default=48,
                        help="video frames of the measured stream (rounded up to whole blocks)")
    parser.add_argument("--warmup-blocks", type=int, default=1, help="unmeasured blocks before each stream")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measured streams per policy, interleaved across policies; fps is their median")
    parser.add_argument("--attention", default="auto", choices=tuple(ATTENTION_BACKENDS),
                        help="pin the SDPA backend (default auto: PyTorch chooses; cudnn and efficient are"
                             " CUDA only)")
    parser.add_argument("--profile-blocks", type=int, default=0,
                        help="profile one more stream of this many blocks per policy (torch.profiler; top"
                             " operators in the JSON's 'profile')")
    parser.add_argument("--model", default=None, help="generator checkpoint, model file or shipped name")
    parser.add_argument("--memory-model", default=None,
                        help="memory model (file or name) for mag/bounded (default: random weights)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights (the default when no --model is given)")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="weights, activations and cache dtype (default: bfloat16 on cuda,"
                             " float32 on cpu)")
    parser.add_argument("--steps", type=int, default=None, help="few-step count (default: the preset's)")
    parser.add_argument("--height", type=int, default=None, help="video height override (pixels)")
    parser.add_argument("--rope-max-positions", type=int, default=None,
                        help="position-table length of a random-weight model, for streams longer than the"
                             " preset's (e.g. 10,000 frames of the tiny preset)")
    parser.add_argument("--width", type=int, default=None, help="video width override (pixels)")
    add_memory_cache_arguments(parser)
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        metavar="MODE",
                        help="torch.compile each block except its cached attention, in torch.compile mode"
                             f" MODE ({', '.join(COMPILE_MODES)}; default 'default'; reduce-overhead adds"
                             " CUDA graphs); falls back to eager on failure")
    parser.add_argument("--no-decode", action="store_true", help="do not decode latents (codec not timed)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", required=True, help="output JSON (the PNG plot is written next to it)")


def _json_path(value: str) -> Path:
    path = Path(value)
    if path.suffix != ".json":
        raise InputError(f"--json must name a .json file, got {value!r}")
    if path.is_dir():
        raise InputError(f"--json {value} is a folder; give a file path such as {value}/speed.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the folder of --json {value}: {err}; choose a writable"
                         " path") from err
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--json {value} is not writable; choose a writable path")
    return path


def run_speed_cli(args: argparse.Namespace) -> int:
    """``mag bench speed``: validate everything cheap first, then build models and stream."""
    from mag.bench.common import machine_info
    from mag.train.checkpoint import git_commit

    started = time.time()
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    config = SpeedConfig(policies=policies, frames=args.frames, warmup_blocks=args.warmup_blocks,
                         decode=not args.no_decode, compile=args.compile, rounds=args.rounds,
                         attention=args.attention, profile_blocks=args.profile_blocks,
                         seed=args.seed).validate()
    json_path = _json_path(args.json)
    if args.random_weights and args.model is not None:
        raise ConfigError("--random-weights and --model exclude each other; give one")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    if args.device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; run on a GPU machine or use"
                          " --device cpu")
    if args.device == "cpu" and config.attention in CUDA_ONLY_ATTENTION:
        raise ConfigError(f"--attention {config.attention} runs on CUDA only; on the CPU use auto, flash or"
                          " math")
    models = build_models(args.preset, model=args.model, memory_model=args.memory_model, policies=policies,
                          device=args.device, dtype=dtype, seed=args.seed, steps=args.steps,
                          height=args.height, width=args.width, rope_max_positions=args.rope_max_positions,
                          memory_sink_frames=args.memory_sink_frames, memory_slots=args.memory_slots)
    metadata = {
        "benchmark": "speed",
        "command": shlex.join(["mag", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(args.device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }
    report = run_speed(models, config, device=args.device, json_path=json_path, metadata=metadata,
                       progress=not args.no_progress)
    for name, row in report["policies"].items():
        kv = row["kv_bytes"][-1]
        print(f"{name:>10}: {row['fps']:8.2f} fps  p50 {row['latency_ms_p50']:8.1f} ms  p95"
              f" {row['latency_ms_p95']:8.1f} ms  peak {row['peak_memory_bytes'] / 2**20:8.1f} MiB"
              f"  KV at {kv[0]} frames {kv[1] / 2**20:.1f} MiB"
              + (f"  x{row['fps_over_window']:.3f} window fps" if "fps_over_window" in row else ""))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')} ({time.time() - started:.1f} s)")
    return 0
