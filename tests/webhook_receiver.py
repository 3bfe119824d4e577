"""A real webhook receiver for tests: an HTTP server on a 127.0.0.1 port, in a thread, that verifies
each request with the official SDK (`OpenAI(webhook_secret=...).webhooks.unwrap`) and keeps what it got."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qlora_cli.probe import free_port


class Receiver:
    """`url` takes POSTs; `answer` is the status it replies (set 503 to play a failing receiver).
    Start it again on the same port after `stop()` to play one that was down for a while."""

    def __init__(self, secret: str | None = None, port: int | None = None) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.answer = 200
        self.received: list[dict[str, Any]] = []  # {"headers", "body", "event"}
        self.refused = 0
        self.invalid: list[str] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.answer != 200:
                    receiver.refused += 1
                    self.send_response(receiver.answer)
                    self.end_headers()
                    return
                event = None
                if receiver.secret is not None:
                    from openai import OpenAI

                    client = OpenAI(api_key="unused", webhook_secret=receiver.secret)
                    try:
                        event = client.webhooks.unwrap(body.decode(), dict(self.headers.items()))
                    except Exception as e:  # a bad signature or shape: what the test must never see
                        receiver.invalid.append(f"{type(e).__name__}: {e}")
                        self.send_response(400)
                        self.end_headers()
                        return
                receiver.received.append({"headers": dict(self.headers.items()), "body": body, "event": event})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
