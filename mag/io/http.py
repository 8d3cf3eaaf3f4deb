"""Untrusted HTTP input, bounded: JSON bodies of limited nesting, text that encodes, a capped
server.

Invariants: :func:`parse_json_body` raises only InputError (never RecursionError or ValueError);
:func:`check_text` (:mod:`mag.io.text`) returns text that UTF-8 can encode, within its length limit;
:class:`BoundedHTTPServer` holds at most ``max_connections`` handler threads, answers the rest 503
at once, and its handlers time out a peer that stalls (slow headers, a body that never comes).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from mag.errors import InputError
from mag.io.text import check_text

__all__ = ["BUSY_RESPONSE", "MAX_JSON_DEPTH", "BoundedHTTPServer", "check_text", "json_depth",
           "parse_json_body"]

# Deepest nesting of arrays/objects a body may have (the control body is one flat object).
MAX_JSON_DEPTH = 8
# What a connection over the cap gets before it is closed.
BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: "
                 b"text/plain\r\nContent-Length: 20\r\n"
                 b"Connection: close\r\n\r\ntoo many connections")


def json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of JSON ``text`` (brackets in strings ignored; linear, no
    recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """UTF-8 JSON of at most ``max_depth`` levels; InputError (one line) for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"body is not UTF-8 (byte {err.start})") from err
    if json_depth(text) > max_depth:
        raise InputError(f"body nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    # JSONDecodeError, and ints past Python's digit limit
    except (ValueError, RecursionError) as err:
        raise InputError(f"body is not JSON: {str(err)[:120]}") from err


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading server with at most ``max_connections`` connections being handled at once."""

    daemon_threads = True
    max_connections = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that vanished or stalled is no error; anything else is one line on stderr."""
        kind, err, _ = sys.exc_info()
        if kind is None or isinstance(err, OSError):
            return
        print(f"mag: error: request from {client_address[0]} failed: {kind.__name__}: {err}",
              file=sys.stderr, flush=True)
