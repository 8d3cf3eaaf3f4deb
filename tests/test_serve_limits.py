"""``mag serve`` survives any request: bounded JSON, encodable text, header timeouts, a connection
cap, and a seeded fuzz run of its endpoints after which the stream still produces frames (loopback
only)."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from helpers import CAMERA, TINY_OVERRIDES, random_dit

import mag.serve.viewer
from mag.app import DEFAULT_TEXT_MODE, LoadedModels
from mag.config import get_preset
from mag.errors import InputError
from mag.io.http import MAX_JSON_DEPTH, check_text, parse_json_body
from mag.pipelines import SamplerConfig
from mag.serve import HOST, LiveStream, Viewer
from mag.serve.live import MAX_PROMPT_CHARS
from mag.serve.viewer import MAX_BODY_BYTES
from mag.text import prompt_cache

TIMEOUT_S = 20.0
SHORT_STREAM = 12
# Fuzz: requests sent, the seed, and the handler timeout while fuzzing (s) so a stalled request
# costs little.
FUZZ_REQUESTS = 1200
FUZZ_SEED = 19
FUZZ_HANDLER_TIMEOUT_S = 0.5
# Connection cap used by the cap test (the default is larger).
SMALL_CAP = 4


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    preset = get_preset("tiny", **TINY_OVERRIDES, **CAMERA)
    return LoadedModels(random_dit(preset.dit, seed=1), preset, {},
                        prompt_cache(preset.text_encoder, DEFAULT_TEXT_MODE))


@pytest.fixture
def server(models, monkeypatch) -> Iterator[tuple[LiveStream, Viewer]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(mag.serve.viewer._Handler, "timeout", FUZZ_HANDLER_TIMEOUT_S)
    live = LiveStream(models, "window", SamplerConfig("euler", 2), "a red wall",
                      max_frames=SHORT_STREAM)
    viewer = Viewer(0)
    viewer.attach(live)
    viewer.start()
    live.start()
    yield live, viewer
    live.stop()
    viewer.close()
    torch.set_num_threads(before)


def _request(port: int, raw: bytes, timeout: float = TIMEOUT_S) -> bytes:
    """Send ``raw`` on a fresh connection, half-close, and read the reply (only its head for a
    stream)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before reading everything
        reply = b""
        # An event stream never ends: stop at its head (or, for an HTTP/0.9 request, its first
        # event).
        while not any(mark in reply for mark in (b"text/event-stream", b"event: frame", b": "
                                                                                        b"waiting")):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
        return reply


def _post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    raw = (f"POST /control HTTP/1.0\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    reply = _request(port, raw)
    return int(reply.split(b" ", 2)[1]), reply.split(b"\r\n\r\n", 1)[-1]


def _frames(viewer: Viewer, count: int) -> list[dict]:
    """``count`` frame events from a fresh /frames connection."""
    out = []
    # keep-alive comments would keep a dead stream open forever
    deadline = time.monotonic() + TIMEOUT_S
    with urllib.request.urlopen(viewer.url + "frames", timeout=TIMEOUT_S) as reply:
        data = None
        while len(out) < count:
            assert time.monotonic() < deadline, f"{len(out)} of {count} frames within {TIMEOUT_S} s"
            line = reply.readline().decode().rstrip("\n")
            if line.startswith("data: "):
                data = line[len("data: "):]
            elif not line and data is not None:
                out.append(json.loads(data))
                data = None
    return out


def test_bodies_are_bounded_and_text_must_encode():
    assert parse_json_body(b'{"prompt": "[not a bracket"}') == {"prompt": "[not a bracket"}
    with pytest.raises(InputError, match="nests deeper"):
        parse_json_body(b"[" * 3000 + b"]" * 3000)
    assert parse_json_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    with pytest.raises(InputError, match="not JSON"):
        # past Python's int digit limit: ValueError, not JSONDecodeError
        parse_json_body(b"9" * 5000)
    with pytest.raises(InputError, match="not UTF-8"):
        parse_json_body(b'{"prompt": "\xff"}')
    with pytest.raises(InputError, match="not valid UTF-8 text"):
        check_text("\ud800", "prompt", MAX_PROMPT_CHARS)


def test_a_lone_surrogate_prompt_is_refused_and_the_stream_goes_on(server):
    """``{"prompt": "\\ud800"}`` used to be answered ok, then the generator thread died for good."""
    live, viewer = server
    status, body = _post(viewer.port, b'{"prompt": "\\ud800"}')
    assert status == 400 and b"not valid UTF-8 text" in body
    status, _ = _post(viewer.port, b"[" * 2000 + b"]" * 2000)
    assert status == 400
    first, second = _frames(viewer, 2)
    assert second["index"] > first["index"] and live.error is None


def test_a_500_character_non_ascii_prompt_is_accepted_when_escaped(server):
    live, viewer = server
    prompt = "\U0001f30a" * MAX_PROMPT_CHARS  # each an escaped surrogate pair: 12 bytes of JSON
    body = json.dumps({"prompt": prompt, "velocity": 1.5}).encode()
    assert len(body) > 4096 and len(body) <= MAX_BODY_BYTES
    status, reply = _post(viewer.port, body)
    assert status == 200 and json.loads(reply)["pending_prompt"] == prompt


def test_slow_headers_time_out_and_connections_are_capped(models, monkeypatch):
    monkeypatch.setattr(mag.serve.viewer._Handler, "timeout", FUZZ_HANDLER_TIMEOUT_S)
    monkeypatch.setattr(mag.serve.viewer._Server, "max_connections", SMALL_CAP)
    live = LiveStream(models, "window", SamplerConfig("euler", 2), "a red wall",
                      max_frames=SHORT_STREAM)
    viewer = Viewer(0)
    viewer.attach(live)
    viewer.start()
    try:
        stalled = [socket.create_connection((HOST, viewer.port),
                                            timeout=TIMEOUT_S) for _ in range(SMALL_CAP)]
        for sock in stalled:
            sock.sendall(b"GET /stats HTTP/1.0\r\nHost: 127")  # headers never finish
        time.sleep(FUZZ_HANDLER_TIMEOUT_S / 4)
        assert b" 503 " in _request(viewer.port, b"GET /stats HTTP/1.0\r\n\r\n")  # over the cap
        start = time.monotonic()
        for sock in stalled:  # the server hangs up on each once its header timeout passes
            assert sock.recv(1024) == b""
            sock.close()
        assert time.monotonic() - start < TIMEOUT_S / 2
        assert b" 200 " in _request(viewer.port,
                                    f"GET /stats HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
    finally:
        viewer.close()


# -- fuzz
# --------------------------------------------------------------------------------------------

STRINGS = ["", " ", "a red wall", "\ud800", "\udfff\ud800", "\u0000", "\U0001f30a" * 600, "x" * 501,
           "é" * 500, "\\", '"', "<script>", "%00", "\r\n"]
PATHS = ["/", "/frames", "/stats", "/control", "/control?x=1", "/nothing", "//", "/../etc/passwd",
         "/" + "a" * 5000, "*", "", "/stats#x", "/%ff"]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "get", "G ET", "\x00",
           "POST"]


def _json_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 12 else 6)
    if kind == 0:
        return rng.choice(STRINGS)
    if kind == 1:
        return rng.choice([0, -1, 1.5, 1e308, -1e308, 2**70, True, False, None, 4.0, -4.0])
    if kind == 2:
        return float(rng.choice(["nan", "inf", "-inf"]))
    if kind in (3, 4, 5):
        return {"velocity": rng.uniform(-20, 20)} if kind == 3 else {"prompt": rng.choice(STRINGS)}
    if kind in (6, 7):
        return {rng.choice(["velocity", "prompt", "x", ""]): _json_value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    return [_json_value(rng, depth + 1) for _ in range(rng.randrange(3))]


def _body(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 1:
        depth = rng.randrange(1, 3000)
        return b"[" * depth + b"]" * depth
    if kind == 2:
        return b"9" * rng.randrange(4000, 6000)
    text = json.dumps(_json_value(rng), ensure_ascii=rng.random() < 0.7)
    return text.encode("utf-8", "surrogatepass")[:MAX_BODY_BYTES + 100]


def _fuzz_request(rng: random.Random) -> bytes:
    """Half well-formed control posts with random bodies, some well-formed GETs, the rest
    anything."""
    shape = rng.random()
    if shape < 0.5:
        body = _body(rng)
        return (f"POST /control HTTP/1.0\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if shape < 0.65:
        return f"GET {rng.choice(PATHS)} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode()
    method, path = rng.choice(METHODS), rng.choice(PATHS)
    body = _body(rng) if rng.random() < 0.7 else b""
    headers = []
    if rng.random() < 0.9:
        headers.append(
            f"Host: {rng.choice([HOST, 'localhost', '[::1]', 'evil.example', '', HOST + ':1'])}"
        )
    if rng.random() < 0.8:
        kind = rng.choice(["application/json", "text/plain", "application/json; x", ""])
        headers.append(f"Content-Type: {kind}")
    if rng.random() < 0.9:
        length = rng.choice([len(body), len(body), 0, -1, len(body) + 10, 10**12, "x",
                             MAX_BODY_BYTES + 1])
        headers.append(f"Content-Length: {length}")
    for _ in range(rng.randrange(3)):
        headers.append(rng.choice(["X-A: " + "b" * rng.randrange(10000), "Bad Header", ": x",
                                   "\x00: \x00"]))
    version = rng.choice(["HTTP/1.0", "HTTP/1.1", "HTTP/9.9", "", "HTTP/1.0 extra"])
    head = (
        f"{method} {path} {version}".rstrip()
        + "\r\n"
        + "".join(h + "\r\n" for h in headers)
        + "\r\n"
    )
    return head.encode("utf-8", "surrogatepass") + body


class _Watcher(threading.Thread):
    """A viewer kept open during the fuzz, so the generator streams and applies every command."""

    def __init__(self, viewer: Viewer) -> None:
        super().__init__(daemon=True)
        self.reply = urllib.request.urlopen(viewer.url + "frames", timeout=TIMEOUT_S)
        self.frames = 0

    def run(self) -> None:
        try:
            for line in self.reply:
                self.frames += line.startswith(b"event: frame")
        except (OSError, ValueError):
            pass  # closed by close()

    def close(self) -> None:
        self.reply.close()


def test_a_seeded_fuzz_of_the_endpoints_leaves_the_stream_producing_frames(server, capfd):
    live, viewer = server
    watcher = _Watcher(viewer)
    watcher.start()
    rng = random.Random(FUZZ_SEED)
    statuses: Counter[str] = Counter()
    try:
        for _ in range(FUZZ_REQUESTS):
            reply = _request(viewer.port, _fuzz_request(rng))
            # A request line the stdlib cannot parse gets its error page without a status line
            # (HTTP/0.9).
            head = reply.split(b" ", 2)
            status = head[1].decode() if reply.startswith(b"HTTP/") else "bare" if reply else "none"
            statuses[status] += 1
    finally:
        watcher.close()
    assert "500" not in statuses, statuses
    # every path was exercised
    assert {"200", "400", "403", "404", "501"} <= set(statuses), statuses
    assert watcher.frames > 0  # the generator ran while the commands came in
    first, second = _frames(viewer, 2)
    assert second["index"] > first["index"] and live.error is None
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed" not in err, err[-2000:]
