"""The timed streams of ``mag bench speed``: per policy, a warm-up stream then measured streams
whose blocks (denoise + cache write + streaming decode) each end with a device synchronise; rounds
are interleaved across policies. What each report field means: docs/benchmark.md, "Speed benchmark".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel

from mag.app import synchronize
from mag.bench.speed.report import peak_bytes, peak_key, write_json, write_plot
from mag.bench.speed.setup import (
    ATTENTION_BACKENDS,
    TEXT_SEED_OFFSET,
    SpeedConfig,
    SpeedModels,
    build_codec,
    kv_bytes_curve,
    latent_frames_for,
    video_frames_for,
)
from mag.cache import ArchiveCache, KVCache
from mag.errors import ConfigError, InputError
from mag.models.compile import CompiledModules, compile_failure, compile_model, compile_scope
from mag.pipelines import (
    StreamingGenerator,
    policy_from_name,
    writer_for,
)

# ---------------------------------------------------------------------------------------------
# Streaming

# Percentiles of the per-block latency in the report.
P50, P95 = 50.0, 95.0
MS_PER_S = 1000.0
US_PER_MS = 1000.0
PROFILE_ROWS = 15  # operators kept per profiled policy
PAN_PATCHES_PER_FRAME = 1.0  # camera-anchored models: the steady pan the stream is told about
# Linux: writing this to /proc/self/clear_refs resets the resident-set high-water mark (VmHWM).
CLEAR_REFS_RESET_PEAK = "5"
KIB = 1024


class _PeakUsage:
    """Peak bytes of a region: CUDA max allocated (``peak_device_bytes``), or the growth of the CPU
    resident-set high-water mark (``peak_rss_bytes``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.key = "peak_device_bytes" if device.type == "cuda" else "peak_rss_bytes"
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


def stream_blocks(gen: StreamingGenerator, context: torch.Tensor, num_blocks: int, *,
                  codec: Any | None, generator: torch.Generator | None) -> tuple[list[float], int]:
    """Stream ``num_blocks`` blocks from a fresh stream; ``(per-block wall seconds, video frames
    made)``.

    Each block's time covers the denoise, the cache write and (with ``codec``) the streaming decode,
    closed by a device synchronise.
    """
    block = gen.frames_per_block
    gen.reset(batch_size=1, horizon_frames=num_blocks * block)
    gen.set_prompt(context)
    decoder = codec.stream_decoder() if codec is not None else None
    device = gen.device
    # A camera-anchored model is told where the camera looks: a steady pan of one patch per frame.
    pan = (torch.arange(num_blocks * block, dtype=torch.float32,
                        device=device)[None] * PAN_PATCHES_PER_FRAME
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


def profile_stream(gen: StreamingGenerator, context: torch.Tensor, num_blocks: int, *,
                   codec: Any | None,
                   generator: torch.Generator | None, rows: int = PROFILE_ROWS) -> dict[str, Any]:
    """Top operators by self time (device time on CUDA, CPU time otherwise) of one profiled
    stream."""
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
        "ops": [
            {
                "op": e.key,
                "self_ms": getattr(e, field) / US_PER_MS,
                "share": getattr(e, field) / total,
                "calls": e.count,
            }
            for e in top
        ],
    }


def run_policy(name: str, models: SpeedModels, codec: Any | None, config: SpeedConfig,
               device: torch.device, context: torch.Tensor, empty_context: torch.Tensor,
               profile_blocks: int = 0) -> tuple[dict[str, Any], KVCache]:
    """Warm up, then stream ``config.frames`` video frames under policy ``name``; the policy's
    report.

    With ``profile_blocks``, one more stream of that many blocks runs under the profiler
    (``profile``)."""
    preset = models.preset
    policy = policy_from_name(name, preset)
    writer = writer_for(policy, memory_model=models.memory_model, empty_context=empty_context)
    gen = StreamingGenerator.for_preset(models.generator, preset, policy, writer=writer)
    blocks = latent_frames_for(preset, config.frames) // preset.cache.frames_per_block
    noise = torch.Generator(device=device).manual_seed(config.seed)
    if config.warmup_blocks:
        stream_blocks(gen, context, config.warmup_blocks, codec=codec, generator=noise)
    usage = _PeakUsage(device)
    usage.start()
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
        usage.key: usage.peak(),
        "peak_method": usage.method,
        "kv_bytes": kv_bytes_curve(policy, preset, cache.k.dtype, horizons),
        "kv_bytes_streamed": cache.nbytes,
        "kv_capacity_bytes_streamed": cache.capacity_bytes,
        "kv_bytes_per_frame": cache.bytes_per_frame,
        "latency_ms_blocks": [s * MS_PER_S for s in seconds],
    }
    if isinstance(cache, ArchiveCache):  # the host tier: one compressed frame per block
        row.update(archive_frames=len(cache.archive), archive_bytes=cache.archive.nbytes,
                   archive_disk_bytes=cache.archive.disk_bytes)
    if profile_blocks:
        row["profile"] = profile_stream(gen, context, profile_blocks, codec=codec, generator=noise)
    return row, cache


def merge_rounds(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One row per policy from its rounds' rows (see the module docstring), with
    ``fps_over_window``."""
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
            peak_key(rows[0]): max(peak_bytes(row) for row in rows),
        }
    window = rounds.get("window", [])
    for name, row in merged.items():
        paired = list(zip(rounds[name], window, strict=False))
        if paired:
            row["fps_over_window"] = statistics.median(mine["fps"] / ref["fps"] for mine,
                                                       ref in paired)
    return merged


def run_speed(models: SpeedModels, config: SpeedConfig, *, device: str, json_path: Path,
              metadata: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Benchmark every policy of ``config`` and write ``json_path`` after each one (a killed run
    keeps what finished) and the plot next to it at the end. Returns the report."""
    config.validate()
    dev = torch.device(device)
    preset = models.preset
    dtype = models.generator.patch_embedding.weight.dtype
    codec = build_codec(preset, dev, dtype, config.seed, models.wan_dir) if config.decode else None
    text_gen = torch.Generator().manual_seed(config.seed + TEXT_SEED_OFFSET)
    text_shape = (1, preset.text_max_tokens, preset.dit.text_dim)
    context = torch.randn(text_shape, generator=text_gen).to(dev, dtype)
    empty_context = torch.randn(text_shape, generator=text_gen).to(dev, dtype)
    compile_info: dict[str, Any] = {"requested": config.compile is not None, "used": False}
    compiled: list[CompiledModules] = []
    if config.compile is not None:
        compiled = [compile_model(m, mode=config.compile) for m in (models.generator,
                                                                    models.memory_model)
                    if m is not None]
        compile_info.update(used=True, mode=config.compile, scope=compile_scope(config.compile))
    warmup = max(config.warmup_blocks, 1) if config.compile is not None else config.warmup_blocks
    config = dataclasses.replace(config, warmup_blocks=warmup)
    report: dict[str, Any] = {
        **metadata,
        "preset": preset.name,
        "video": {"height": preset.video.height, "width": preset.video.width,
                  "codec": preset.video.codec,
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
        "text": {"encoder": None, "context": f"fixed random {list(text_shape)} (the text encoder "
                                             "runs once"
                                             " per prompt, outside the block loop; not timed)"},
        "cache": dataclasses.asdict(preset.cache),
        "policies": {},
    }
    def measure(name: str, profile_blocks: int) -> dict[str, Any]:
        nonlocal compiled
        try:
            row, cache = run_policy(name, models, codec, config, dev, context, empty_context,
                                    profile_blocks)
        # compile errors surface on the first forward: fall back once to eager
        except Exception as err:
            if not compiled or isinstance(err, (ConfigError, InputError)):
                raise
            for c in compiled:
                c.restore()
            compiled = []
            compile_info.update(used=False, error=f"{type(err).__name__}: {err}"[:2000])
            print(f"mag: torch.compile failed ({compile_failure(err)}); continuing without "
                  "compile (recorded"
                  " in the JSON)", file=sys.stderr, flush=True)
            row, cache = run_policy(name, models, codec, config, dev, context, empty_context,
                                    profile_blocks)
        del cache
        return row

    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in config.policies}
    backend = ATTENTION_BACKENDS[config.attention]
    for round_index in range(config.rounds):
        shift = round_index % len(config.policies)
        for name in config.policies[shift:] + config.policies[:shift]:
            if progress:
                print(f"[{time.strftime('%H:%M:%S')}] {name} (round "
                      f"{round_index + 1}/{config.rounds}):"
                      f" warmup {warmup} blocks, then {config.frames} video frames",
                      file=sys.stderr, flush=True)
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                row = measure(name, config.profile_blocks if round_index == 0 else 0)
            rounds[name].append(row)
            if progress:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {row['fps']:.2f} fps,"
                      f" p50 {_percentile(row['latency_ms_blocks'], P50):.1f} ms,"
                      f" peak {peak_bytes(row) / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            report["policies"] = merge_rounds(rounds)
            write_json(json_path, report)
    report["plot"] = write_plot(report, json_path.with_suffix(".png")).name
    write_json(json_path, report)
    return report
