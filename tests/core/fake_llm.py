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
- ``"ratelimit"``: HTTP 429 with ``Retry-After: <retry_after>``.

``queue`` holds modes for the next requests, consumed first (``["error"]`` = fail once, then ``mode``).
Every request is counted (``count``) and recorded (``requests``: headers, parsed body and the
monotonic arrival time ``at``).

Usage: the ``fake_llm`` fixture in ``conftest.py``, or ``with FakeLLM() as fake: fake.base_url``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[list[dict]], str]


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
        self.requests: list[dict[str, Any]] = []
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
            return self.queue.pop(0) if self.queue else self.mode

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
            if mode == "error":
                return self._send(500, b'{"error": "internal error"}')
            if mode == "garbage":
                return self._send(200, fake.garbage_body)
            if mode == "missing":
                return self._send(200, b'{"id": "fake", "choices": [{"index": 0, "message": {"role": "assistant"}}]}')
            if mode == "ratelimit":
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": fake.retry_after})
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
