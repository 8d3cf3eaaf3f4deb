"""``mag serve``: the live viewer end to end over HTTP (page, event stream, control, stats, stream
reset, camera steering measured in the frames of the shipped model, prompt switches), its one-line
errors, Ctrl-C, and the page driven in headless Chromium through the DevTools protocol."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import CAMERA, TINY_OVERRIDES, needs_inductor, random_dit
from PIL import Image

from mag.app import DEFAULT_TEXT_MODE, DEFAULTS, LoadedModels, load_models, sampler_config
from mag.cli import main
from mag.config import get_preset
from mag.generate import DEFAULT_PROMPT, frame_shifts
from mag.pipelines import SamplerConfig
from mag.serve import HOST, LiveStream, Viewer
from mag.text import prompt_cache

# Seconds any single wait on the server or the browser may take before the test fails.
TIMEOUT_S = 20.0
STEP_PX = 4.0
# Consecutive frame pairs at one commanded velocity whose content shift must equal it.
PAIRS = 4
# The random-model stream is reset after this many frames (4 blocks), so one test sees a reset.
SHORT_STREAM = 12
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores are shared with other jobs: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_models() -> LoadedModels:
    """A random-weight camera-anchored tiny generator and the text encoder of the shipped models."""
    preset = get_preset("tiny", **TINY_OVERRIDES, **CAMERA)
    return LoadedModels(random_dit(preset.dit, seed=1), preset, {},
                        prompt_cache(preset.text_encoder, DEFAULT_TEXT_MODE))


@pytest.fixture(scope="module")
def shipped_models() -> LoadedModels:
    return load_models(DEFAULTS, with_memory=False)


def _serve(loaded: LoadedModels, policy: str, sampler: SamplerConfig, prompt: str,
           max_frames: int) -> tuple[LiveStream, Viewer]:
    live = LiveStream(loaded, policy, sampler, prompt, max_frames=max_frames, seed=0)
    viewer = Viewer(0)
    viewer.attach(live)
    viewer.start()
    live.start()
    return live, viewer


@pytest.fixture
def served() -> Iterator[Callable[..., tuple[LiveStream, Viewer]]]:
    started: list[tuple[LiveStream, Viewer]] = []

    def start(*args: Any) -> tuple[LiveStream, Viewer]:
        started.append(_serve(*args))
        return started[-1]

    yield start
    for live, viewer in started:
        live.stop()
        viewer.close()


# ---------------------------------------------------------------------------------------------
# HTTP helpers


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post(url: str, body: Any, content_type: str = "application/json") -> tuple[int, dict[str,
                                                                                          Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "control", data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _stats(url: str) -> dict[str, Any]:
    status, body = _get(url + "stats")
    assert status == 200
    return json.loads(body)


class Events:
    """The ``/frames`` event stream read with urllib: one decoded ``frame`` event per
    :meth:`next`."""

    def __init__(self, url: str) -> None:
        self.reply = urllib.request.urlopen(url + "frames", timeout=TIMEOUT_S)
        assert self.reply.headers["Content-Type"] == "text/event-stream"

    def next(self) -> dict[str, Any]:
        kind, data = None, None
        while True:
            line = self.reply.readline()
            assert line, "the event stream ended"
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
            elif not line and kind == "frame" and data is not None:
                return json.loads(data)

    def until(self, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            event = self.next()
            if done(event):
                return event
        raise AssertionError(f"no frame {what} within {TIMEOUT_S} s")

    def close(self) -> None:
        self.reply.close()


def _pixels(png_base64: str) -> np.ndarray:
    """A frame event's PNG -> uint8 ``[H, W, 3]``."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB"))


def _shifts_at(frames: list[dict[str, Any]], velocity: float) -> list[int]:
    """Content shift of every consecutive pair (global index i-1, i) whose frame i was generated at
    ``velocity`` in the same stream."""
    by_index = {f["index"]: f for f in frames}
    out = []
    for f in frames:
        prev = by_index.get(f["index"] - 1)
        if prev is not None and f["velocity"] == velocity and f.get("stream_frame", 1) > 0:
            pair = np.stack([_pixels(prev["png"]), _pixels(f["png"])])
            out.append(int(frame_shifts(pair, 2 * int(STEP_PX))[0]))
    return out


# ---------------------------------------------------------------------------------------------
# End to end over HTTP


def test_viewer_streams_steers_switches_prompts_and_resets(random_models, served):
    live, viewer = served(random_models, "window", SamplerConfig("euler", 2), "a red wall",
                          SHORT_STREAM)
    offsets_px: dict[int, float] = {}
    generate_block = live.generator.generate_block

    def spy(noise: torch.Generator, offsets: torch.Tensor) -> torch.Tensor:
        """Record the width offsets (px) each global frame is generated at."""
        for j, value in enumerate((offsets[0] * live.patch_px).tolist()):
            offsets_px[live._next_index + j] = value
        return generate_block(noise, offsets)

    live.generator.generate_block = spy
    url = viewer.url
    assert url.startswith(f"http://{HOST}:")

    status, page = _get(url)
    html = page.decode()
    assert status == 200 and '<img id="frame"' in html and "image-rendering: pixelated" in html
    assert (
        'new EventSource("/frames")' in html
        and '"ArrowRight"' in html
        and 'id="prompt-input"' in html
    )

    events = Events(url)
    try:
        first = events.next()
        assert _pixels(first["png"]).shape == (16, 16, 3)
        assert first["stats"]["kv_bytes"] > 0 and first["stats"]["prompt"] == "a red wall"

        seen = []
        for velocity in (STEP_PX, -STEP_PX):
            status, reply = _post(url, {"velocity": velocity})
            assert status == 200 and reply["velocity"] == velocity
            seen.append(events.until(lambda e, v=velocity: e["velocity"] == v, "at velocity "
                                                                               f"{velocity}"))
            seen += [events.next() for _ in range(2 * SHORT_STREAM)]  # crosses a stream reset
        # The commanded velocity is the camera's step, in the event and in the generator's width
        # offsets.
        for prev, cur in zip(seen[:-1], seen[1:], strict=True):
            if cur["index"] == prev["index"] + 1 and cur["stream_frame"] > 0:
                assert cur["camera_px"] - prev["camera_px"] == cur["velocity"]
            assert offsets_px[cur["index"]] == pytest.approx(cur["camera_px"])
        assert {e["velocity"] for e in seen} == {STEP_PX, -STEP_PX}

        # After max_frames the cache is emptied, the camera returns to 0 and the page gets a notice.
        reset = events.until(lambda e: e["stream_frame"] == 0, "starting a new stream")
        assert (
            reset["index"] >= SHORT_STREAM
            and reset["camera_px"] == 0
            and reset["stats"]["resets"] >= 1
        )
        assert "reset after 12 frames" in reset["stats"]["notice"]

        status, reply = _post(url, {"prompt": "  a blue sea "})
        assert status == 200 and reply["pending_prompt"] == "a blue sea"
        switched = events.until(lambda e: e["stats"]["prompt"] == "a blue sea", "under the new "
                                                                                "prompt")
        new_context = random_models.model.encode_context(random_models.encode(["a blue sea"]))
        assert live.prompt == "a blue sea" and torch.equal(live.generator.context.k, new_context.k)
    finally:
        events.close()

    stats = _stats(url)
    assert stats["prompt"] == "a blue sea" and stats["pending_prompt"] is None
    assert stats["velocity"] == -STEP_PX
    assert stats["fps"] > 0 and stats["kv_bytes"] > 0 and stats["frame"] >= switched["index"]
    assert (
        stats["policy"] == "window"
        and stats["max_frames"] == SHORT_STREAM
        and stats["error"] is None
    )


def test_control_and_host_errors(random_models, served):
    _, viewer = served(random_models, "window", SamplerConfig("euler", 2), "a red wall",
                       SHORT_STREAM)
    url = viewer.url
    status, reply = _post(url, {"velocity": 100})
    assert status == 400 and "exceeds the frame width 16" in reply["error"]
    for body in ({"speed": 1}, [], {"prompt": "   "}, {"velocity": "fast"}):
        status, reply = _post(url, body)
        assert status == 400 and reply["error"], body
    assert _post(url, b"{not json")[0] == 400
    assert _post(url, {"velocity": 0}, content_type="text/plain")[0] == 415
    status, body = _get(url + "stats", headers={"Host": "attacker.example:80"})
    assert status == 403 and b"refused" in body
    assert _get(url + "nothing")[0] == 404


def test_shipped_model_turns_where_the_velocity_says(shipped_models, served):
    """Frame content over HTTP: the shipped camera-anchored model's frames shift by the commanded
    velocity, +4 then -4 px/frame."""
    _, viewer = served(shipped_models, "window", sampler_config(DEFAULTS), DEFAULT_PROMPT, 480)
    events = Events(viewer.url)
    try:
        for velocity in (STEP_PX, -STEP_PX):
            assert _post(viewer.url, {"velocity": velocity})[0] == 200
            frames = [events.until(lambda e, v=velocity: e["velocity"] == v, "at velocity "
                                                                             f"{velocity}")]
            frames += [events.next() for _ in range(PAIRS)]
            assert _shifts_at(frames, velocity) == [velocity] * PAIRS
    finally:
        events.close()


@needs_inductor
def test_compiled_live_stream_serves_the_eager_frames_and_restores_the_models(shipped_models):
    """--compile: the warm-up block compiles before the first frame, the published frames decode to
    the eager stream's (within one 8-bit level), and stop() leaves the loaded model eager."""
    def frames(live: LiveStream) -> np.ndarray:
        published = [f for _ in range(3) for f in live.step()]
        return np.stack([_pixels(f.png) for f in published])

    eager = LiveStream(shipped_models, "window", sampler_config(DEFAULTS), DEFAULT_PROMPT,
                       max_frames=48)
    expected = frames(eager)
    torch._dynamo.reset()
    live = LiveStream(shipped_models, "window", sampler_config(DEFAULTS), DEFAULT_PROMPT,
                      max_frames=48, compile_model=True)
    try:
        assert "before_cache" in vars(shipped_models.model.blocks[0])
        got = frames(live)
    finally:
        live.stop()
        torch._dynamo.reset()
    assert (
        np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1 and expected.std() > 10
    )
    assert "before_cache" not in vars(shipped_models.model.blocks[0])


# ---------------------------------------------------------------------------------------------
# Command line


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mag: error: "), err
    return err[0]


def test_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in _one_error_line(capsys)


@pytest.mark.parametrize("case", ["policy", "checkpoint", "memory", "max-frames"])
def test_serve_errors_are_one_line(case, tmp_path, capsys):
    extra = {"policy": ["--policy", "sliding"], "checkpoint": ["--model",
                                                               str(tmp_path / "missing.pt")],
             "memory": ["--memory-model", ""],
             "max-frames": ["--policy", "window", "--max-frames", "1"]}[case]
    assert main(["serve", "--port", "0", *extra]) == 2
    _one_error_line(capsys)


def test_ctrl_c_stops_the_server_cleanly():
    command = [sys.executable, "-m", "mag", "serve", "--port", "0", "--policy", "window",
               "--memory-model", ""]
    # A suite started in the background (`nohup make test &`) runs with SIGINT ignored, which
    # children inherit and Python then keeps: give the server the default disposition, as a terminal
    # would.
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("mag serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        events = Events(url)
        events.next()
        events.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "mag serve: stopped after" in out and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = ("the browser test needs Debian's chromium: run `apt-get install -y "
                "--no-install-recommends"
                " chromium` as root (.ci/run does), or set MAG_SKIP_BROWSER_TESTS=1 to skip it")
KEY_CODES = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "Enter": 13}


class DevTools:
    """A minimal Chrome DevTools Protocol client on one page target (request/response over a
    websocket)."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=TIMEOUT_S, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"the page did not {what} within {TIMEOUT_S} s")

    def press(self, key: str, text: str = "") -> None:
        params = {"key": key, "code": key, "windowsVirtualKeyCode": KEY_CODES[key]}
        self.call("Input.dispatchKeyEvent", type="keyDown", text=text, **params)
        self.call("Input.dispatchKeyEvent", type="keyUp", **params)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def chromium() -> Iterator[DevTools]:
    binary = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    if binary is None:
        if os.environ.get("MAG_SKIP_BROWSER_TESTS") == "1":
            pytest.skip("MAG_SKIP_BROWSER_TESTS=1")
        pytest.fail(INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="mag-chromium-") as profile:
        proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--no-first-run",
                                 "--no-default-browser-check",
                                 "--remote-debugging-address=127.0.0.1",
                                 "--remote-debugging-port=0",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        tools = None
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + TIMEOUT_S
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            targets = json.loads(_get(f"http://127.0.0.1:{port}/json/list")[1])
            page = next(t for t in targets if t["type"] == "page")
            tools = DevTools(page["webSocketDebuggerUrl"])
            yield tools
        finally:
            if tools is not None:
                tools.close()
            os.killpg(proc.pid, signal.SIGTERM)  # the wrapper script and the browser it started
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


FRAMES_JS = "JSON.stringify(window.magViewer.frames)"


def test_browser_page_shows_frames_steers_with_arrow_keys_and_switches_prompt(shipped_models,
                                                                              served, chromium):
    _, viewer = served(shipped_models, "window", sampler_config(DEFAULTS), DEFAULT_PROMPT, 480)
    url = viewer.url
    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=url)
    chromium.wait_for("window.magViewer && window.magViewer.received >= 6", "receive frames")
    # The <img> shows a decoded 16x16 PNG frame; the readouts show the live FPS and KV memory.
    assert chromium.evaluate("document.getElementById('frame').naturalWidth") == 16
    chromium.wait_for("parseFloat(document.getElementById('fps').textContent) > 0", "show the FPS")
    assert "bytes" in chromium.evaluate("document.getElementById('kv').textContent")

    for key, velocity in (("ArrowLeft", -STEP_PX), ("ArrowRight", STEP_PX)):
        chromium.press(key)
        chromium.wait_for(f"window.magViewer.frames.filter(f => f.velocity === {velocity}).length "
                          f"> {PAIRS}",
                          f"show frames at {velocity} px/frame after {key}")
        frames = json.loads(chromium.evaluate(FRAMES_JS))
        shifts = _shifts_at(frames, velocity)
        assert len(shifts) >= PAIRS and set(shifts) == {int(velocity)}, (key, shifts)
    chromium.press("ArrowUp")
    chromium.wait_for("window.magViewer.frames.slice(-1)[0].velocity === 0", "stop the camera on "
                                                                             "ArrowUp")
    assert _stats(url)["velocity"] == 0

    prompt = "a snowy mountain ridge at dawn"
    chromium.evaluate("document.getElementById('prompt-input').focus()")
    chromium.call("Input.insertText", text=prompt)
    chromium.press("Enter", text="\r")
    chromium.wait_for(f"document.getElementById('prompt').textContent === {json.dumps(prompt)}",
                      "show the new prompt")
    stats = _stats(url)
    assert stats["prompt"] == prompt and stats["velocity"] == 0
