"""Out-of-process benchmark servers: moto or SeaweedFS S3, the Tripo emulator, a counting proxy."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tripo_watchd.sandbox import LocalS3, S3Server, SeaweedS3Server, TripoEmulator


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: CountingProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _ProxyHandler(BaseHTTPRequestHandler):
    """Keeps the client's connection alive and forwards each request upstream on its own.

    moto's werkzeug server answers every request with `Connection: close`, which would make
    any client look like it opens one connection per request; real S3 keeps connections
    alive, and this proxy plays that part so the client's connection reuse is what counts.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each answer's body waits 40 ms for a delayed ACK
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self.server.proxy.opened_one()
        if self.server.proxy.rtt:
            time.sleep(self.server.proxy.rtt)  # the TCP handshake a real network would cost

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy.closed_one()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self) -> None:
        body = self._body()
        if self.server.proxy.rtt:
            time.sleep(self.server.proxy.rtt)
        upstream = http.client.HTTPConnection(
            "127.0.0.1", self.server.proxy.upstream_port, timeout=60
        )
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders(body if body else None)
            answer = upstream.getresponse()
            data = answer.read()
        except OSError:
            self.send_error(502)
            return
        finally:
            upstream.close()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = _forward
    do_PUT = _forward
    do_POST = _forward
    do_HEAD = _forward
    do_DELETE = _forward


_HOP_BY_HOP = {"connection", "keep-alive", "expect", "proxy-connection", "upgrade", "te"}


class CountingProxy:
    """An HTTP/1.1 keep-alive proxy on 127.0.0.1 that counts client TCP connections to S3."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rtt = 0.0  # seconds added per new connection and per request
        self.opened = 0
        self.open_now = 0
        self.peak_open = 0
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def opened_one(self) -> None:
        with self._lock:
            self.opened += 1
            self.open_now += 1
            self.peak_open = max(self.peak_open, self.open_now)

    def closed_one(self) -> None:
        with self._lock:
            self.open_now -= 1

    def reset(self) -> None:
        with self._lock:
            self.opened = 0
            self.peak_open = self.open_now

    def figures(self) -> dict[str, int]:
        with self._lock:
            return {"opened": self.opened, "open_now": self.open_now, "peak_open": self.peak_open}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--s3", choices=("moto", "seaweedfs"), default="moto")
    args = parser.parse_args()
    server: LocalS3 = (
        SeaweedS3Server(args.state) if args.s3 == "seaweedfs" else S3Server(args.state)
    )
    with server as s3, TripoEmulator(s3, api_keys=[args.api_key]) as emulator:
        proxy = CountingProxy(s3.port).start()
        info = {
            "api_base_url": emulator.base_url,
            "emulator_root": emulator.root_url,
            "s3_direct": s3.endpoint_url,
            "s3_proxy": f"http://127.0.0.1:{proxy.port}",
            "bucket": s3.bucket,
            "region": s3.region,
        }
        print(json.dumps(info), flush=True)
        # Commands on stdin, one a line; EOF stops everything.
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                proxy.reset()
                print(json.dumps(proxy.figures()), flush=True)
            elif command.startswith("rtt "):
                proxy.rtt = float(command.split()[1]) / 1000
                print(json.dumps(proxy.figures()), flush=True)
            elif command == "conns":
                print(json.dumps(proxy.figures()), flush=True)
            elif command.startswith("creds "):
                # Credentials for a key pattern (e.g. `bench-aws/*`): what a baseline that cannot
                # ask a token per file uses. Same actions as a Tripo token, broader resource.
                creds = s3.mint_credentials(s3.bucket, command.split(None, 1)[1])
                print(json.dumps(creds), flush=True)
            elif command == "tokens":
                print(json.dumps({"tokens": emulator.token_count()}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
