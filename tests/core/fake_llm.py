"""A fake OpenAI-compatible ``/v1/chat/completions`` server for tests (stdlib only).

Runs a ``ThreadingHTTPServer`` on 127.0.0.1 (free port) in a daemon thread. Behaviour is switchable at
run time through ``mode``:

- ``"ok"``: 200 with ``reply`` as the assistant message; ``reply`` is a string or a function of the
  request's messages returning one.
- ``"error"``: HTTP 500.
- ``"hang"``: waits ``hang_s`` (longer than the client timeout) before answering ok.
- ``"garbage"``: 200 with ``garbage_body`` (non-JSON by default; set it to JSON without ``choices``).
- ``"missing"``: 200 with valid JSON whose choice has no ``message.content``.
- ``"drip"``: 200 with a valid reply, sent one byte every ``drip_s`` seconds.
- ``"huge"``: 200 with ``huge_bytes`` of body streamed without a Content-Length (ends at close).
- ``"chunked"``: the same body as HTTP/1.1 ``Transfer-Encoding: chunked`` (no Content-Length either).
- ``"ratelimit"``: HTTP 429 with ``Retry-After: <retry_after>``.

``queue`` holds modes for the next requests, consumed first (``["error"]`` = fail once, then ``mode``).
Every request is counted (``count``) and recorded (``requests``: headers, parsed body and the
monotonic arrival time ``at``).

Vision requests: a message's content may be a list of OpenAI content parts. Every ``image_url`` part
must carry a base64 data URL (``data:<mime>;base64,...``), as a vision server needs; its decoded bytes
are recorded in ``images`` (arrival order), and a malformed one is answered with HTTP 400 as vLLM
answers an image it cannot read. :func:`text_of` gives a message's text parts, for ``reply`` functions.

Usage: the ``fake_llm`` fixture in ``conftest.py``, or ``with FakeLLM() as fake: fake.base_url``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[list[dict]], str]
_DATA_URL = re.compile(r"data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)", re.DOTALL)


def text_of(message: dict) -> str:
    """The text of one chat message: its content string, or its text parts joined."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


def _decoded_images(body: Any) -> list[bytes]:
    """The bytes of every image_url part of a request body; ValueError for one that is not a base64 data URL."""
    out = []
    for message in body.get("messages", []) if isinstance(body, dict) else []:
        parts = message.get("content")
        for part in parts if isinstance(parts, list) else []:
            if part.get("type") != "image_url":
                continue
            match = _DATA_URL.fullmatch(str(part.get("image_url", {}).get("url", "")))
            if match is None:
                raise ValueError("image_url is not a base64 data URL")
            try:
                out.append(base64.b64decode(match["data"], validate=True))
            except binascii.Error as e:
                raise ValueError(f"image_url data is not base64: {e}") from None
    return out


class FakeLLM:
    def __init__(self, reply: Reply = "ok", mode: str = "ok", hang_s: float = 2.0) -> None:
        self.reply: Reply = reply
        self.mode = mode
        self.hang_s = hang_s
        self.drip_s = 1.0
        self.huge_bytes = 50_000_000
        self.retry_after = "1"
        self.garbage_body = b"<html>upstream proxy error</html>"
        self.queue: list[str] = []
        # mode of the n-th request (0-based), when set: faults on a schedule (a soak run); `queue` still goes first
        self.schedule: Callable[[int], str] | None = None
        self.requests: list[dict[str, Any]] = []
        self.images: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval keeps shutdown (once per test) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> FakeLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases hanging handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, headers: dict[str, str], body: Any) -> str:
        with self._lock:
            self.requests.append({"headers": headers, "body": body, "at": time.monotonic()})
            if self.queue:
                return self.queue.pop(0)
            return self.schedule(len(self.requests) - 1) if self.schedule else self.mode

    def _reply_text(self, body: Any) -> str:
        messages = body.get("messages", []) if isinstance(body, dict) else []
        return self.reply(messages) if callable(self.reply) else self.reply


def _handler_for(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            mode = fake._record(dict(self.headers), body)
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": "not found"}')
            try:
                images = _decoded_images(body)
            except ValueError as e:
                return self._send(400, json.dumps({"error": f"invalid image: {e}"}).encode())
            with fake._lock:
                fake.images.extend(images)
            if mode == "error":
                return self._send(500, b'{"error": "internal error"}')
            if mode == "garbage":
                return self._send(200, fake.garbage_body)
            if mode == "missing":
                return self._send(200, b'{"id": "fake", "choices": [{"index": 0, "message": {"role": "assistant"}}]}')
            if mode == "ratelimit":
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": fake.retry_after})
            if mode == "chunked":
                return self._stream_chunked()
            if mode == "huge":
                return self._stream_huge()
            if mode == "hang" and fake._stop.wait(fake.hang_s):
                return  # server stopping: drop the connection
            content = fake._reply_text(body)
            out = {"id": "fake", "object": "chat.completion",
                   "model": (body or {}).get("model", ""),
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content}}]}
            if mode == "drip":
                return self._drip(json.dumps(out).encode())
            self._send(200, json.dumps(out).encode())

        def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout) and closed the socket
                pass

        def _drip(self, data: bytes) -> None:
            """A valid reply, one byte at a time: every read succeeds, the whole never arrives in time."""
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    if fake._stop.wait(fake.drip_s):
                        return
            except OSError:
                pass

        def _stream_chunked(self) -> None:
            """`huge_bytes` of body in HTTP/1.1 chunks: no Content-Length, and the connection could stay open."""
            chunk = b"x" * 65536
            try:
                self.protocol_version = "HTTP/1.1"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(fake.huge_bytes // len(chunk)):
                    if fake._stop.is_set():
                        return
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client stopped reading and closed the socket
                pass

        def _stream_huge(self) -> None:
            """`huge_bytes` of body with no Content-Length: only reading it tells how large it is."""
            chunk = b"x" * 65536
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"choices": [{"message": {"content": "')
                for _ in range(fake.huge_bytes // len(chunk)):
                    if fake._stop.is_set():
                        return
                    self.wfile.write(chunk)
                self.wfile.write(b'"}}]}')
            except OSError:  # the client stopped reading and closed the socket
                pass

    return Handler
