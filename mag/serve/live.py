"""The live stream behind ``mag serve``: a generator thread streams blocks while a page watches.

Camera-anchored models get width offsets from the commanded velocity (read at each block boundary);
a new prompt is applied at the next block boundary by KV re-cache. A stream lasts ``max_frames``
frames, then the cache is emptied and the camera returns to 0. Design notes: docs/generate.md, "Live
viewer".
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from mag.app import LoadedModels, check_velocity
from mag.codecs import Codec, get_codec_for, tensor_to_frames
from mag.errors import ConfigError
from mag.io.text import check_text
from mag.models.compile import CompiledModules
from mag.pipelines import (
    SamplerConfig,
    StreamingGenerator,
    check_policy_name,
    compile_stream,
    policy_from_name,
    writer_for,
)

DEFAULT_PORT = 8765
DEFAULT_POLICY = "mag"
# Velocity the stream starts at, and the arrow keys' step (px/frame): the tiny world's camera speed.
START_VELOCITY_PX = 4.0
# Policies whose cache (and per-block cost) stays bounded, so a stream may run to the RoPE table's
# end.
RING_POLICIES = ("window", "bounded", "official", "archive")
# Stream length of the policies whose cache grows (full, downsample, mag): measured for
# tiny-causal-long under mag on the shared 2-core CPU, the rate falls from ~50 FPS (empty cache) to
# ~29 FPS at 480 frames and below 20 FPS past ~600.
GROWING_MAX_FRAMES = 480
# Frames kept for viewers that fall behind (a viewer further back skips to the newest).
RING_FRAMES = 48
# Generated-FPS smoothing: weight of the newest block's rate.
FPS_EMA = 0.2
# How long a stream-reset notice stays up (s).
NOTICE_S = 4.0
MAX_PROMPT_CHARS = 500
# How long stop() waits for the generator thread to finish its block (s).
JOIN_TIMEOUT_S = 10.0


def default_max_frames(policy: str, rope_max_positions: int) -> int:
    """Frames per stream when ``--max-frames`` is not given: the RoPE table's length under a ring
    policy, :data:`GROWING_MAX_FRAMES` under one whose cache grows."""
    return rope_max_positions if policy in RING_POLICIES else min(GROWING_MAX_FRAMES,
                                                                  rope_max_positions)


@dataclass(frozen=True)
class LiveFrame:
    """One published frame: its global ``index`` (never reset), position in the current stream, the
    camera velocity it was generated at (px/frame) and its camera position (px, the width offset it
    was generated at), the base64 PNG and the stats after its block."""

    index: int
    stream_frame: int
    velocity: float
    camera_px: float
    png: str
    stats: dict[str, Any]

    def event(self) -> bytes:
        """The frame as one Server-Sent Event (``event: frame``, JSON data)."""
        data = {"index": self.index, "stream_frame": self.stream_frame, "velocity": self.velocity,
                "camera_px": self.camera_px, "png": self.png, "stats": self.stats}
        return f"id: {self.index}\nevent: frame\ndata: {json.dumps(data)}\n\n".encode()


def _png_base64(frame: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> base64 PNG (lossless; fastest zlib level: the frames are tiny)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class LiveStream:
    """The generator thread: streams blocks while a viewer watches, takes velocity and prompt
    commands.

    Args:
        loaded: :class:`mag.app.LoadedModels` (its memory model is needed under ``mag`` /
        ``bounded``). policy_name: cache policy (:data:`mag.pipelines.AVAILABLE_POLICIES`). sampler:
        :class:`mag.pipelines.SamplerConfig`. prompt: the first prompt. max_frames: frames per
        stream before the cache is emptied (rounded down to whole blocks).
    """

    def __init__(self, loaded: LoadedModels, policy_name: str, sampler: SamplerConfig, prompt: str,
                 *, max_frames: int, seed: int = 0, velocity: float = START_VELOCITY_PX,
                 compile_model: bool = False, codec: Codec | None = None) -> None:
        import torch

        preset = loaded.preset
        check_policy_name(policy_name, has_memory_model=loaded.memory is not None)
        self.block = preset.cache.frames_per_block
        limit = loaded.model.cfg.rope_max_positions
        if not self.block <= max_frames <= limit:
            raise ConfigError(f"--max-frames must be in [{self.block}, {limit}] (one block of"
                              f" {self.block} frames .. dit.rope_max_positions), got {max_frames}")
        self.loaded = loaded
        self.policy_name = policy_name
        self.horizon = max_frames - max_frames % self.block
        self.max_px = float(preset.video.width)
        self.patch_px = preset.dit.patch_size[2]
        self.camera_rope = preset.dit.camera_rope
        policy = policy_from_name(policy_name, preset)
        writer = writer_for(policy, memory_model=loaded.memory, empty_context=loaded.empty_context)
        self.generator = StreamingGenerator.for_preset(loaded.model, preset, policy,
                                                       sampler=sampler, writer=writer)
        self.codec = codec if codec is not None else get_codec_for(preset.video)
        self.decoder = self.codec.stream_decoder()  # whole-video decode, block by block
        self.noise = torch.Generator(device=self.generator.device).manual_seed(seed)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ring: deque[LiveFrame] = deque(maxlen=RING_FRAMES)
        # Commands (guarded by _cond), read by the generator at each block boundary.
        self._velocity = _check_velocity(velocity, self.max_px)
        self._pending_prompt: str | None = None
        self._viewers = 0
        # Generator-side state: only the generator thread writes these (stats snapshots go under
        # _cond).
        self.prompt = _check_prompt(prompt)
        self._context = loaded.encode([self.prompt])
        self._camera_px = 0.0
        self._next_index = 0
        self._fps = 0.0
        self._last_publish: float | None = None
        self._resets = 0
        self._notice = ""
        self._notice_until = 0.0
        self.error: str | None = None
        self._compiled: list[CompiledModules] = []
        if compile_model:  # before the first frame, so compiling does not stall the viewer's stream
            offsets = torch.zeros(1, self.block) if self.camera_rope else None
            self._compiled, failure = compile_stream(self.generator, self._context,
                                                     width_offsets=offsets)
            if failure is not None:
                print(f"mag: torch.compile failed ({failure}); serving without compile",
                      file=sys.stderr, flush=True)
        self._start_stream()
        self._snapshot: dict[str, Any] = self._stream_stats()

    # -- commands (any thread) -------------------------------------------------------------------

    def set_velocity(self, value: Any) -> float:
        """Command the camera velocity (px/frame) from the next block on; InputError when out of
        range."""
        velocity = _check_velocity(value, self.max_px)
        with self._cond:
            self._velocity = velocity
        return velocity

    def set_prompt(self, value: Any) -> str:
        """Switch to prompt ``value`` at the next block boundary (KV re-cache); InputError when
        invalid."""
        prompt = _check_prompt(value)
        with self._cond:
            self._pending_prompt = prompt
        return prompt

    def stats(self) -> dict[str, Any]:
        """The live readouts: generated FPS, KV bytes, frame index, velocity, prompt
        (JSON-ready)."""
        with self._cond:
            return {**self._snapshot, "velocity": self._velocity,
                    "pending_prompt": self._pending_prompt,
                    "viewers": self._viewers,
                    "notice": self._notice if time.time() < self._notice_until
                    else "", "error": self.error}

    # -- viewers ---------------------------------------------------------------------------------

    def attach(self) -> int:
        """A viewer starts watching; returns the index of the newest frame (-1 before the first)."""
        with self._cond:
            self._viewers += 1
            self._cond.notify_all()
            return self._next_index - 1

    def detach(self) -> None:
        with self._cond:
            self._viewers -= 1

    def frames_after(self, index: int, timeout: float) -> list[LiveFrame]:
        """Frames newer than ``index`` still in the ring (oldest first), waiting up to ``timeout``
        s."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or self._next_index - 1 > index,
                                timeout)
            return [frame for frame in self._ring if frame.index > index]

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- the generator thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mag-serve-generator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current block and wake every viewer."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)
        for compiled in self._compiled:  # the loaded models are eager again
            compiled.restore()
        self._compiled = []

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    self._cond.wait_for(lambda: self._viewers > 0 or self._stop.is_set())
                if not self._stop.is_set():
                    self.step()
        except Exception as err:  # shown on the page and stderr; the server stays up
            self.error = f"{type(err).__name__}: {err}"
            print(f"mag: error: generator stopped: {self.error}", file=sys.stderr, flush=True)
            with self._cond:
                self._snapshot = {**self._snapshot, "error": self.error}
                self._cond.notify_all()

    def step(self) -> list[LiveFrame]:
        """Generate and publish one block (the generator thread's unit of work; tests call it
        directly)."""
        import torch

        gen = self.generator
        if gen.position + self.block > self.horizon:
            self._resets += 1
            self._notice = (f"stream reset after {self.horizon} frames (--max-frames): the cache "
                            "starts"
                            " empty and the camera returns to 0")
            self._notice_until = time.time() + NOTICE_S
            print(f"mag serve: {self._notice}", flush=True)
            self._start_stream()
        with self._cond:
            velocity, prompt = self._velocity, self._pending_prompt
            self._pending_prompt = None
        if prompt is not None:
            self._switch_prompt(prompt)
        first = gen.position
        track = [self._camera_px + velocity * (j + (first > 0)) for j in range(self.block)]
        self._camera_px = track[-1]
        offsets = None
        if self.camera_rope:
            offsets = torch.tensor([track], dtype=torch.float32) / self.patch_px
        latents = gen.generate_block(self.noise, offsets)
        pixels = tensor_to_frames(self.decoder.decode(latents)[0])
        # a block's latent frames; 9 then 12 video frames through Wan's causal VAE
        count = len(pixels)
        latent_of = [min(j * self.block // count, self.block - 1) for j in range(count)]
        now = time.perf_counter()
        if self._last_publish is not None and now > self._last_publish:
            rate = count / (now - self._last_publish)
            self._fps = rate if self._fps == 0 else (1 - FPS_EMA) * self._fps + FPS_EMA * rate
        self._last_publish = now
        snapshot = self._stream_stats(self._next_index + count - 1)
        frames = [LiveFrame(self._next_index + j, first + latent_of[j], velocity,
                            track[latent_of[j]],
                            _png_base64(pixels[j]), snapshot) for j in range(count)]
        with self._cond:
            self._snapshot = snapshot
            self._ring.extend(frames)
            self._next_index += count
            self._cond.notify_all()
        return frames

    def _switch_prompt(self, prompt: str) -> None:
        """Encode and apply a new prompt; if the encoder refuses it, keep streaming the current
        one."""
        gen = self.generator
        try:
            context = self.loaded.encode([prompt])
        except Exception as err:  # a command must never stop the stream
            self._notice = (
                f"prompt not applied ({type(err).__name__}: {err}); keeping the current one"
            )
            self._notice_until = time.time() + NOTICE_S
            print(f"mag serve: {self._notice}", file=sys.stderr, flush=True)
            return
        self._context = context
        (gen.set_prompt if gen.position == 0 else gen.recache)(self._context)
        self.prompt = prompt

    def _stream_stats(self, frame: int = -1) -> dict[str, Any]:
        """The generator-side readouts after the block ending at global frame ``frame``."""
        gen = self.generator
        caches = [c for c in (gen.cache, gen.uncond_cache) if c is not None]
        return {"fps": round(self._fps, 2), "kv_bytes": sum(c.nbytes for c in caches),
                "kv_capacity_bytes": sum(c.capacity_bytes for c in caches), "frame": frame,
                "stream_frame": gen.position - 1, "max_frames": self.horizon,
                "camera_px": self._camera_px,
                "prompt": self.prompt, "policy": self.policy_name, "resets": self._resets,
                "notice": self._notice if time.time() < self._notice_until else ""}

    def _start_stream(self) -> None:
        """An empty cache under the current prompt, the camera at 0."""
        self.generator.reset(1, self.horizon)
        self.generator.set_prompt(self._context)
        self.decoder.reset()
        self._camera_px = 0.0


def _check_velocity(value: Any, max_px: float) -> float:
    return check_velocity(value, "velocity", max_px)


def _check_prompt(value: Any) -> str:
    return check_text(value, "prompt", MAX_PROMPT_CHARS)
