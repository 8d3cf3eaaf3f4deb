"""``mag serve``: a live browser viewer. A generator thread streams blocks without end; a local web page
shows the frames as they come, steers the camera with the arrow keys and switches the prompt.

Why Server-Sent Events with base64 PNG frames (``GET /frames``) rather than multipart MJPEG: the tiny
models' frames are 16x16, where JPEG's 8x8 chroma blocks would smear them (PNG is lossless and about 1 KB
a frame), and each event is JSON, so the frame travels with its index, the camera velocity it was
generated at and the live FPS / KV readouts; the page draws it into an ``<img>`` (upscaled with
``image-rendering: pixelated``) and ``EventSource`` reconnects by itself.

The generator is the one ``mag generate`` streams (:func:`mag.demo.load_models`, the same policies and
sampler): camera-anchored models get width offsets from the commanded velocity (the camera track of
:func:`mag.world.camera_track`, velocity read at each block boundary), and a new prompt is applied at the
next block boundary by :meth:`~mag.pipelines.StreamingGenerator.recache` (LongLive's KV re-cache). A
stream lasts ``max_frames`` frames (RoPE positions and, under growing policies, the cache and the cost of
a block are bounded by it); then the cache is emptied, the camera returns to 0 and the page shows a
notice. Generation runs only while a page is watching, so an idle server costs no CPU.

Security: the server binds 127.0.0.1 only, answers only requests whose ``Host`` is the loopback address
(no DNS rebinding) and takes control only as ``application/json`` (which a foreign page cannot post
without a CORS preflight this server never grants).

Endpoints: ``GET /`` (the page), ``GET /frames`` (the event stream), ``GET /stats`` (JSON), ``POST
/control`` with ``{"velocity": v}`` (px/frame) and/or ``{"prompt": "..."}``.
"""

from __future__ import annotations

import argparse
import base64
import errno
import io
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from mag.errors import ConfigError, InputError

__all__ = ["LiveFrame", "LiveStream", "Viewer", "default_max_frames"]

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_POLICY = "mag"
# Velocity the stream starts at, and the arrow keys' step (px/frame): the tiny world's camera speed.
START_VELOCITY_PX = 4.0
STEER_STEP_PX = 4.0
# Policies whose cache (and per-block cost) stays bounded, so a stream may run to the RoPE table's end.
RING_POLICIES = ("window", "bounded")
# Stream length of the policies whose cache grows (full, downsample, mag): measured for tiny-causal-long
# under mag on the shared 2-core CPU, the rate falls from ~50 FPS (empty cache) to ~29 FPS at 480 frames
# and below 20 FPS past ~600.
GROWING_MAX_FRAMES = 480
# Frames kept for viewers that fall behind (a viewer further back skips to the newest).
RING_FRAMES = 48
# Frames a viewer that fell behind still receives before the newest (older ones are skipped).
BACKLOG_FRAMES = 6
# Generated-FPS smoothing: weight of the newest block's rate.
FPS_EMA = 0.2
# A viewer sends frames of one block spread over this fraction of a frame interval each, so the
# display stays smooth and never falls behind the generator.
PACE_FRACTION = 0.9
# Longest pause between two frames a viewer paces (s), and the keep-alive period of an idle stream (s).
MAX_PACE_S = 0.25
KEEPALIVE_S = 1.0
# How long a stream-reset notice stays up (s).
NOTICE_S = 4.0
MAX_PROMPT_CHARS = 500
MAX_BODY_BYTES = 4096
# How long stop() waits for the generator thread to finish its block (s).
JOIN_TIMEOUT_S = 10.0
# Display size of the frames on the page (CSS px) and the frames the page keeps for inspection.
DISPLAY_PX = 512
PAGE_KEEP_FRAMES = 16


def default_max_frames(policy: str, rope_max_positions: int) -> int:
    """Frames per stream when ``--max-frames`` is not given: the RoPE table's length under a ring policy,
    :data:`GROWING_MAX_FRAMES` under one whose cache grows."""
    return rope_max_positions if policy in RING_POLICIES else min(GROWING_MAX_FRAMES, rope_max_positions)


@dataclass(frozen=True)
class LiveFrame:
    """One published frame: its global ``index`` (never reset), position in the current stream, the camera
    velocity it was generated at (px/frame) and its camera position (px, the width offset it was generated
    at), the base64 PNG and the stats after its block."""

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
    """The generator thread: streams blocks while a viewer watches, takes velocity and prompt commands.

    Args:
        loaded: :class:`mag.demo.LoadedModels` (its memory model is needed under ``mag`` / ``bounded``).
        policy_name: cache policy (:data:`mag.pipelines.AVAILABLE_POLICIES`).
        sampler: :class:`mag.pipelines.SamplerConfig`.
        prompt: the first prompt.
        max_frames: frames per stream before the cache is emptied (rounded down to whole blocks).
    """

    def __init__(self, loaded: Any, policy_name: str, sampler: Any, prompt: str, *, max_frames: int,
                 seed: int = 0, velocity: float = START_VELOCITY_PX, compile_model: bool = False) -> None:
        import torch

        from mag.codecs import get_codec_for
        from mag.pipelines import (
            StreamingGenerator,
            check_policy_name,
            compile_stream,
            policy_from_name,
            writer_for,
        )

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
        self.generator = StreamingGenerator.for_preset(loaded.model, preset, policy, sampler=sampler,
                                                       writer=writer)
        self.codec = get_codec_for(preset.video)
        self.noise = torch.Generator(device=self.generator.device).manual_seed(seed)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ring: deque[LiveFrame] = deque(maxlen=RING_FRAMES)
        # Commands (guarded by _cond), read by the generator at each block boundary.
        self._velocity = _check_velocity(velocity, self.max_px)
        self._pending_prompt: str | None = None
        self._viewers = 0
        # Generator-side state: only the generator thread writes these (stats snapshots go under _cond).
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
        self._compiled: list[Any] = []
        if compile_model:  # before the first frame, so compiling does not stall the viewer's stream
            offsets = torch.zeros(1, self.block) if self.camera_rope else None
            self._compiled, failure = compile_stream(self.generator, self._context, width_offsets=offsets)
            if failure is not None:
                print(f"mag: torch.compile failed ({failure}); serving without compile", file=sys.stderr,
                      flush=True)
        self._start_stream()
        self._snapshot: dict[str, Any] = self._stream_stats()

    # -- commands (any thread) -------------------------------------------------------------------

    def set_velocity(self, value: Any) -> float:
        """Command the camera velocity (px/frame) from the next block on; InputError when out of range."""
        velocity = _check_velocity(value, self.max_px)
        with self._cond:
            self._velocity = velocity
        return velocity

    def set_prompt(self, value: Any) -> str:
        """Switch to prompt ``value`` at the next block boundary (KV re-cache); InputError when invalid."""
        prompt = _check_prompt(value)
        with self._cond:
            self._pending_prompt = prompt
        return prompt

    def stats(self) -> dict[str, Any]:
        """The live readouts: generated FPS, KV bytes, frame index, velocity, prompt (JSON-ready)."""
        with self._cond:
            return {**self._snapshot, "velocity": self._velocity, "pending_prompt": self._pending_prompt,
                    "viewers": self._viewers, "notice": self._notice if time.time() < self._notice_until
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
        """Frames newer than ``index`` still in the ring (oldest first), waiting up to ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or self._next_index - 1 > index, timeout)
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
        """Generate and publish one block (the generator thread's unit of work; tests call it directly)."""
        import torch

        from mag.codecs import tensor_to_frames

        gen = self.generator
        if gen.position + self.block > self.horizon:
            self._resets += 1
            self._notice = (f"stream reset after {self.horizon} frames (--max-frames): the cache starts"
                            " empty and the camera returns to 0")
            self._notice_until = time.time() + NOTICE_S
            print(f"mag serve: {self._notice}", flush=True)
            self._start_stream()
        with self._cond:
            velocity, prompt = self._velocity, self._pending_prompt
            self._pending_prompt = None
        if prompt is not None:
            self._context = self.loaded.encode([prompt])
            (gen.set_prompt if gen.position == 0 else gen.recache)(self._context)
            self.prompt = prompt
        first = gen.position
        track = [self._camera_px + velocity * (j + (first > 0)) for j in range(self.block)]
        self._camera_px = track[-1]
        offsets = None
        if self.camera_rope:
            offsets = torch.tensor([track], dtype=torch.float32) / self.patch_px
        latents = gen.generate_block(self.noise, offsets)
        pixels = tensor_to_frames(self.codec.decode(latents)[0])
        now = time.perf_counter()
        if self._last_publish is not None and now > self._last_publish:
            rate = self.block / (now - self._last_publish)
            self._fps = rate if self._fps == 0 else (1 - FPS_EMA) * self._fps + FPS_EMA * rate
        self._last_publish = now
        snapshot = self._stream_stats(self._next_index + self.block - 1)
        frames = [LiveFrame(self._next_index + j, first + j, velocity, track[j], _png_base64(pixels[j]),
                            snapshot) for j in range(self.block)]
        with self._cond:
            self._snapshot = snapshot
            self._ring.extend(frames)
            self._next_index += self.block
            self._cond.notify_all()
        return frames

    def _stream_stats(self, frame: int = -1) -> dict[str, Any]:
        """The generator-side readouts after the block ending at global frame ``frame``."""
        gen = self.generator
        caches = [c for c in (gen.cache, gen.uncond_cache) if c is not None]
        return {"fps": round(self._fps, 2), "kv_bytes": sum(c.nbytes for c in caches),
                "kv_capacity_bytes": sum(c.capacity_bytes for c in caches), "frame": frame,
                "stream_frame": gen.position - 1, "max_frames": self.horizon, "camera_px": self._camera_px,
                "prompt": self.prompt, "policy": self.policy_name, "resets": self._resets,
                "notice": self._notice if time.time() < self._notice_until else ""}

    def _start_stream(self) -> None:
        """An empty cache under the current prompt, the camera at 0."""
        self.generator.reset(1, self.horizon)
        self.generator.set_prompt(self._context)
        self._camera_px = 0.0


def _check_velocity(value: Any, max_px: float) -> float:
    from mag.generate import _velocity

    return _velocity(value, "velocity", max_px)


def _check_prompt(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"prompt must be a non-empty string, got {value!r:.60}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt has {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return value.strip()


# ---------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    """Routes of the viewer; ``server.live`` is the :class:`LiveStream`."""

    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: the event stream ends with it

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a live stream would log a line per poll."""

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name in ("127.0.0.1", "localhost", "[::1]"):
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": f"host {host!r} refused: the viewer answers only"
                                                        f" http://{HOST}:{self.server.server_port}/"})
        return False

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        live = self.server.live
        if path == "/":
            self._send(HTTPStatus.OK, page_html(live).encode(), "text/html; charset=utf-8")
        elif path == "/stats":
            self._send_json(HTTPStatus.OK, live.stats())
        elif path == "/frames":
            self._stream_frames(live)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}; try /, /frames, /stats or"
                                                            " POST /control"})

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.path.split("?", 1)[0] != "/control":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"cannot POST {self.path}; POST /control"})
            return
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            self._send_json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            {"error": f"POST /control takes application/json, got {content_type!r}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"POST /control needs a JSON body of 1 to"
                                                              f" {MAX_BODY_BYTES} bytes"})
            return
        try:
            reply = apply_control(self.server.live, json.loads(self.rfile.read(length)))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {err}"})
        except InputError as err:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        else:
            self._send_json(HTTPStatus.OK, reply)

    def _stream_frames(self, live: LiveStream) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        last = live.attach()
        try:
            while not live.stopped and not self.server.closing:
                frames = live.frames_after(last, KEEPALIVE_S)
                if not frames:
                    self.wfile.write(b": waiting\n\n")  # finds closed connections
                    self.wfile.flush()
                    continue
                frames = frames[-BACKLOG_FRAMES:]  # a viewer that fell behind skips ahead
                fps = frames[-1].stats.get("fps") or 0.0
                pause = min(PACE_FRACTION / fps, MAX_PACE_S) if fps > 0 else 0.0
                for i, frame in enumerate(frames):
                    if i:
                        time.sleep(pause)
                    self.wfile.write(frame.event())
                    self.wfile.flush()
                    last = frame.index
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away
        finally:
            live.detach()


def apply_control(live: LiveStream, body: Any) -> dict[str, Any]:
    """Apply a ``POST /control`` body ``{"velocity": v, "prompt": p}`` (either or both); InputError if bad."""
    if not isinstance(body, dict) or not body or set(body) - {"velocity", "prompt"}:
        raise InputError(f"POST /control takes a JSON object with \"velocity\" (px/frame) and/or \"prompt\","
                         f" got {json.dumps(body)[:80]}")
    reply: dict[str, Any] = {"ok": True}
    if "velocity" in body:
        reply["velocity"] = live.set_velocity(body["velocity"])
    if "prompt" in body:
        reply["pending_prompt"] = live.set_prompt(body["prompt"])
    return reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    live: LiveStream
    closing = False


class Viewer:
    """The HTTP server on ``127.0.0.1:port`` (0: a free port) in front of ``live``.

    Raises:
        InputError: the port is taken or not allowed (checked at construction, before any model work
            when ``live`` is attached later with :meth:`attach`).
    """

    def __init__(self, port: int) -> None:
        if not 0 <= port <= 65535:
            raise InputError(f"--port must be in [0, 65535] (0 picks a free port), got {port}")
        try:
            self.server = _Server((HOST, port), _Handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} on {HOST} is in use; stop what is serving it or choose"
                                 " another with --port (0 picks a free one)") from err
            raise InputError(f"cannot listen on {HOST}:{port}: {err.strerror or err}; choose another"
                             " --port") from err
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def attach(self, live: LiveStream) -> None:
        self.server.live = live

    def start(self) -> None:
        """Serve from a background thread (tests); the command serves from the main thread."""
        self._thread = threading.Thread(target=self.server.serve_forever, name="mag-serve-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, end the event streams, close the socket."""
        self.server.closing = True
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(JOIN_TIMEOUT_S)
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# The page

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mag serve</title>
<style>
body { background: #111; color: #ddd; font: 14px/1.4 system-ui, sans-serif; margin: 16px; }
#frame { width: __DISPLAY__px; height: __DISPLAY__px; image-rendering: pixelated; background: #000;
         display: block; border: 1px solid #333; }
#readouts span { display: inline-block; min-width: 11em; }
#notice { color: #fc5; min-height: 1.4em; }
#error { color: #f66; min-height: 1.4em; }
input { width: 36em; background: #222; color: #eee; border: 1px solid #555; padding: 4px; }
kbd { border: 1px solid #666; border-radius: 3px; padding: 0 4px; }
</style></head>
<body>
<h3>mag serve &mdash; policy __POLICY__</h3>
<img id="frame" alt="generated frame">
<div id="readouts">
 <span>generated: <b id="fps">-</b> FPS</span>
 <span>shown: <b id="shown-fps">-</b> FPS</span>
 <span>KV memory: <b id="kv">-</b></span><br>
 <span>frame: <b id="frame-index">-</b></span>
 <span>velocity: <b id="velocity">-</b> px/frame</span>
 <span>stream frame: <b id="stream-frame">-</b> / __MAX_FRAMES__</span>
</div>
<div id="notice"></div>
<div>prompt: <i id="prompt"></i></div>
<form id="prompt-form">
<input id="prompt-input" placeholder="type a new prompt, then Enter" maxlength="__MAX_PROMPT__">
<button type="submit">set prompt</button></form>
<p><kbd>&larr;</kbd> / <kbd>&rarr;</kbd> pan the camera at __STEP__ px/frame;
<kbd>&uarr;</kbd>, <kbd>&darr;</kbd> or <kbd>space</kbd> stop it.</p>
<div id="error"></div>
<script>
"use strict";
const STEP = __STEP__, KEEP = __KEEP__;
const byId = (id) => document.getElementById(id);
const img = byId("frame"), input = byId("prompt-input");
// The page's state, for inspection: the last KEEP frames received and counters.
const viewer = window.magViewer = {frames: [], received: 0, stats: null};
const shown = [];
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function showStats(s) {
  viewer.stats = s;
  byId("fps").textContent = s.fps.toFixed(1);
  byId("kv").textContent = bytes(s.kv_bytes) + " (" + s.kv_bytes + " bytes)";
  byId("prompt").textContent = s.prompt;
}
const events = new EventSource("/frames");
events.addEventListener("frame", (e) => {
  const f = JSON.parse(e.data);
  img.src = "data:image/png;base64," + f.png;
  viewer.frames.push({index: f.index, velocity: f.velocity, png: f.png});
  if (viewer.frames.length > KEEP) viewer.frames.shift();
  viewer.received++;
  const now = performance.now();
  shown.push(now);
  while (shown.length && shown[0] < now - 1000) shown.shift();
  byId("shown-fps").textContent = shown.length;
  byId("frame-index").textContent = f.index;
  byId("stream-frame").textContent = f.stream_frame;
  byId("velocity").textContent = f.velocity;
  showStats(f.stats);
});
async function poll() {
  try {
    const s = await (await fetch("/stats")).json();
    byId("notice").textContent = s.notice;
    byId("error").textContent = s.error ? "generator stopped: " + s.error : "";
  } catch (err) { byId("error").textContent = "server unreachable"; }
}
setInterval(poll, 500);
async function control(body) {
  const r = await fetch("/control", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body)});
  const reply = await r.json();
  byId("error").textContent = r.ok ? "" : reply.error;
}
document.addEventListener("keydown", (e) => {
  if (e.target === input) return;
  let v = null;
  if (e.key === "ArrowRight") v = STEP;
  else if (e.key === "ArrowLeft") v = -STEP;
  else if (e.key === "ArrowUp" || e.key === "ArrowDown" || e.key === " ") v = 0;
  if (v === null) return;
  e.preventDefault();
  control({velocity: v});
});
byId("prompt-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (input.value.trim()) control({prompt: input.value});
  input.blur();
});
</script>
</body></html>
"""


def page_html(live: LiveStream) -> str:
    """The self-contained viewer page (inline CSS and JS)."""
    import html

    values = {"__DISPLAY__": str(DISPLAY_PX), "__POLICY__": html.escape(live.policy_name),
              "__MAX_FRAMES__": str(live.horizon), "__MAX_PROMPT__": str(MAX_PROMPT_CHARS),
              "__STEP__": f"{STEER_STEP_PX:g}", "__KEEP__": str(PAGE_KEEP_FRAMES)}
    page = _PAGE
    for key, value in values.items():
        page = page.replace(key, value)
    return page


# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    from mag.demo import add_compile_argument, add_model_arguments

    p = subparsers.add_parser(
        "serve", help="live browser viewer on 127.0.0.1: frames stream, arrow keys steer, prompts switch",
        description="Stream generated frames live to a local web page (127.0.0.1 only): the arrow keys"
                    " steer the camera, a text box switches the prompt (KV re-cache), FPS and KV memory"
                    " are shown live. Ctrl-C stops. See docs/generate.md.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"cache policy: full, window, downsample, mag, bounded (default {DEFAULT_POLICY})")
    p.add_argument("--prompt", default=None, help="first prompt (default: a test-split world prompt)")
    p.add_argument("--max-frames", type=int, default=None,
                   help=f"frames per stream before the cache is emptied (default: {GROWING_MAX_FRAMES} under"
                        " full, downsample and mag, whose cache grows; the RoPE table's length under window"
                        " and bounded)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    add_compile_argument(p)
    add_model_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from mag.demo import config_from_args, load_models, sampler_config, set_threads
    from mag.generate import DEFAULT_PROMPT
    from mag.pipelines.streaming import MEMORY_MODEL_POLICIES, check_policy_name

    set_threads(args.threads)
    config = config_from_args(args)
    check_policy_name(args.policy, has_memory_model=bool(config.memory_model))  # before any model loads
    sampler = sampler_config(config)
    viewer = Viewer(args.port)  # a taken port fails before any model is loaded
    try:
        needs_memory = args.policy in MEMORY_MODEL_POLICIES and bool(config.memory_model)
        loaded = load_models(config, device=args.device, with_memory=needs_memory)
        max_frames = args.max_frames
        if max_frames is None:
            max_frames = default_max_frames(args.policy, loaded.model.cfg.rope_max_positions)
        live = LiveStream(loaded, args.policy, sampler, args.prompt or DEFAULT_PROMPT,
                          max_frames=max_frames, seed=args.seed, compile_model=args.compile)
    except BaseException:
        viewer.close()
        raise
    viewer.attach(live)
    live.start()
    print(f"mag serve: {viewer.url} (policy {args.policy}, {live.horizon} frames per stream; frames are"
          " generated while a page is open) -- Ctrl-C to stop", flush=True)
    try:
        viewer.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        viewer.server.closing = True
        live.stop()
        viewer.close()
    print(f"mag serve: stopped after {live.stats().get('frame', -1) + 1} frames", flush=True)
    return 0
