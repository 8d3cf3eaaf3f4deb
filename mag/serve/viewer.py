"""The HTTP side of ``mag serve``: the page (``mag/assets/viewer.html``), the frame event stream,
control.

Binds 127.0.0.1 only, answers only loopback ``Host`` headers (no DNS rebinding) and takes control
only as ``application/json``. Endpoints: ``GET /``, ``GET /frames`` (Server-Sent Events), ``GET
/stats``, ``POST /control`` with ``{"velocity": v}`` and/or ``{"prompt": "..."}``. Untrusted input
is bounded (:mod:`mag.io.http`): JSON nesting, text that must encode, a request timeout and a
connection cap.
"""

from __future__ import annotations

import errno
import html
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any

from mag.errors import InputError
from mag.io.http import BoundedHTTPServer, parse_json_body
from mag.serve.live import (
    JOIN_TIMEOUT_S,
    MAX_PROMPT_CHARS,
    LiveStream,
)

HOST = "127.0.0.1"
# The arrow keys' step (px/frame): the tiny world's camera speed.
STEER_STEP_PX = 4.0
# Frames a viewer that fell behind still receives before the newest (older ones are skipped).
BACKLOG_FRAMES = 6
# A viewer sends frames of one block spread over this fraction of a frame interval each, so the
# display stays smooth and never falls behind the generator.
PACE_FRACTION = 0.9
# Longest pause between two frames a viewer paces (s), and the keep-alive period of an idle stream
# (s).
MAX_PACE_S = 0.25
KEEPALIVE_S = 1.0
# A control body holds a prompt of MAX_PROMPT_CHARS characters even when every one is written as a
# JSON surrogate-pair escape ("\\ud83d\\ude00", 12 bytes), plus the velocity and the braces.
MAX_ESCAPED_CHAR_BYTES = 12
BODY_OVERHEAD_BYTES = 1024
MAX_BODY_BYTES = MAX_PROMPT_CHARS * MAX_ESCAPED_CHAR_BYTES + BODY_OVERHEAD_BYTES
# A peer must send its request (headers and body) within this many seconds; a viewer that stops
# reading the event stream for this long is dropped. Connections handled at once (more are answered
# 503).
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
# Display size of the frames on the page (CSS px) and the frames the page keeps for inspection.
DISPLAY_PX = 512
PAGE_KEEP_FRAMES = 16
# The page, inside the package (pyproject package data: mag/assets).
PAGE_ASSET = "assets/viewer.html"


class _Handler(BaseHTTPRequestHandler):
    """Routes of the viewer; ``server.live`` is the :class:`LiveStream`."""

    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: the event stream ends with it
    timeout = REQUEST_TIMEOUT_S  # socket timeout: slow headers, bodies and stalled viewers

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a live stream would log a line per poll."""

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name in ("127.0.0.1", "localhost", "[::1]"):
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": f"host {host!r} refused: the viewer "
                                                        "answers only"
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
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}; try /, /frames, "
                                                            "/stats or"
                                                            " POST /control"})

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.path.split("?", 1)[0] != "/control":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"cannot POST {self.path}; POST "
                                                            "/control"})
            return
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            self._send_json(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                {"error": f"POST /control takes application/json, got {content_type!r}"},
            )
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "POST /control needs a JSON body "
                                                              "of 1 to"
                                                              f" {MAX_BODY_BYTES} bytes"})
            return
        try:
            reply = apply_control(self.server.live, parse_json_body(self.rfile.read(length)))
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
        except OSError:  # the page went away, or stopped reading for REQUEST_TIMEOUT_S
            pass  # the page went away
        finally:
            live.detach()


def apply_control(live: LiveStream, body: Any) -> dict[str, Any]:
    """Apply a ``POST /control`` body ``{"velocity": v, "prompt": p}`` (either or both); InputError
    if bad."""
    if not isinstance(body, dict) or not body or set(body) - {"velocity", "prompt"}:
        raise InputError("POST /control takes a JSON object with \"velocity\" (px/frame) and/or "
                         "\"prompt\","
                         f" got {json.dumps(body)[:80]}")
    reply: dict[str, Any] = {"ok": True}
    if "velocity" in body:
        reply["velocity"] = live.set_velocity(body["velocity"])
    if "prompt" in body:
        reply["pending_prompt"] = live.set_prompt(body["prompt"])
    return reply


class _Server(BoundedHTTPServer):
    max_connections = MAX_CONNECTIONS
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
                raise InputError(f"port {port} on {HOST} is in use; stop what is serving it or "
                                 "choose"
                                 " another with --port (0 picks a free one)") from err
            raise InputError(f"cannot listen on {HOST}:{port}: {err.strerror or err}; choose "
                             "another"
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
        self._thread = threading.Thread(target=self.server.serve_forever, name="mag-serve-http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, end the event streams, close the socket."""
        self.server.closing = True
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(JOIN_TIMEOUT_S)
        self.server.server_close()


def page_html(live: LiveStream) -> str:
    """The self-contained viewer page (inline CSS and JS), filled in for ``live``."""
    values = {"__DISPLAY__": str(DISPLAY_PX), "__POLICY__": html.escape(live.policy_name),
              "__MAX_FRAMES__": str(live.horizon), "__MAX_PROMPT__": str(MAX_PROMPT_CHARS),
              "__STEP__": f"{STEER_STEP_PX:g}", "__KEEP__": str(PAGE_KEEP_FRAMES)}
    page = resources.files("mag").joinpath(PAGE_ASSET).read_text(encoding="utf-8")
    for key, value in values.items():
        page = page.replace(key, value)
    return page
