"""A real S3 endpoint for tests: `moto_server` on 127.0.0.1 (a free port, its own process group, stopped by its
group id), and a small HTTP proxy in front of it that breaks chosen requests (5xx, throttling, a body cut off
mid-way, a consistently short body) so retries and verification meet real failures on the wire."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "expect", "content-length"}
ERRORS = {500: "InternalError", 503: "SlowDown"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """moto_server in its own process group; `url` is its endpoint."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("moto_server did not answer within 30 s")

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def require_auth_after(self, free_requests: int | str) -> None:
        """moto's IAM check: the next `free_requests` requests pass unchecked, later ones need valid IAM keys
        ('inf' switches the check off again)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=str(free_requests).encode(),
                                         headers={"Content-Type": "text/plain"}, method="POST")
        urllib.request.urlopen(request, timeout=5).close()


@dataclass
class Fault:
    action: str          # "500", "503", "cut" (full Content-Length, half the body, then close), "short" (half
                         # the body with a matching Content-Length and no checksum headers: only the client's own
                         # size/checksum verification can tell)
    times: int
    method: str = "GET"
    path_contains: str = ""


class FaultProxy(ThreadingHTTPServer):
    """Forwards every request to `target`; requests matching an injected Fault fail the way it says."""

    daemon_threads = True

    def __init__(self, target_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.target_port = target_port
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.faults: list[Fault] = []
        self.hits: list[tuple[str, str, str]] = []   # (method, path, action) of every request that was broken
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def inject(self, action: str, times: int = 1, method: str = "GET", path_contains: str = "") -> None:
        with self.lock:
            self.faults.append(Fault(action, times, method, path_contains))

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.path_contains in path:
                    fault.times -= 1
                    self.hits.append((method, path, fault.action))
                    return fault.action
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        action = self.server.take(self.command, self.path)
        self.close_connection = True
        if action in ("500", "503"):
            status = int(action)
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{ERRORS[status]}</Code>'
                   f"<Message>injected by the test proxy</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        length = response.getheader("Content-Length", str(len(data)))
        if action == "short":
            data = data[: len(data) // 2]
            length = str(len(data))
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and not (action == "short" and key.lower().startswith("x-amz-checksum")):
                self.send_header(key, value)
        self.send_header("Content-Length", length)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if action == "cut" else data)
            self.wfile.flush()
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
