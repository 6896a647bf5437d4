#!/usr/bin/env python3
"""A prefill/decode proxy in front of two vLLM servers running kvrt, after
vLLM's disaggregated-prefill examples: each /v1/completions or
/v1/chat/completions request goes first to the prefill server (kvrt's
kv_producer) with max_tokens 1, whose kvrt writes the prompt's KV to the
shared tier (Redis), then unchanged to the decode server (kv_consumer),
whose kvrt loads it (waiting up to consumer_wait_ms for writes still
landing) and decodes; the client gets the decode server's answer,
streamed or not.

    python perf/pd_proxy.py --prefill http://127.0.0.1:8100 \\
        --decode http://127.0.0.1:8200 --port 8000   (listens on 127.0.0.1)

As a library: p = Proxy(prefill_url, decode_url); p.start() -> port;
p.stop(). Other paths (/v1/models, /health, /metrics) go to the decode
server. A failed prefill is not fatal: the decode server recomputes.

Threads: one per connection (ThreadingHTTPServer); stop() from any thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPLIT = ("/v1/completions", "/v1/chat/completions")


def _forward(url: str, body: bytes | None, headers: dict, timeout: float):
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={k: v for k, v in headers.items()
                                          if k.lower() in ("content-type", "authorization")})
    return urllib.request.urlopen(req, timeout=timeout)


class Proxy:
    def __init__(self, prefill: str, decode: str, port: int = 0, timeout: float = 600.0):
        self.prefill, self.decode, self.timeout = prefill.rstrip("/"), decode.rstrip("/"), timeout
        self.prefill_errors = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _reply(self, resp):
                self.send_response(resp.status)
                chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
                for k, v in resp.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if chunked or resp.headers.get("Content-Length") is None:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while True:
                        b = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                        if not b:
                            break
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def _error(self, code: int, msg: str):
                data = json.dumps({"error": {"message": msg}}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path in SPLIT:
                    try:
                        pre = json.loads(body)
                        pre.update(max_tokens=1, stream=False)
                        pre.pop("max_completion_tokens", None)
                        pre.pop("stream_options", None)
                        with _forward(proxy.prefill + self.path, json.dumps(pre).encode(),
                                      dict(self.headers), proxy.timeout) as r:
                            r.read()
                    except (OSError, ValueError):
                        proxy.prefill_errors += 1  # the decode server recomputes
                self._to_decode(body)

            def do_GET(self):
                self._to_decode(None)

            def _to_decode(self, body):
                try:
                    with _forward(proxy.decode + self.path, body, dict(self.headers),
                                  proxy.timeout) as r:
                        self._reply(r)
                except urllib.error.HTTPError as e:
                    self._reply(e)
                except OSError as e:
                    self._error(502, f"decode server: {e}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = None

    def start(self) -> int:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self.port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread:
            self.thread.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", required=True, help="the kv_producer server's base URL")
    ap.add_argument("--decode", required=True, help="the kv_consumer server's base URL")
    ap.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free)")
    a = ap.parse_args(argv)
    p = Proxy(a.prefill, a.decode, a.port)
    print(f"pd_proxy: 127.0.0.1:{p.port} -> prefill {p.prefill}, decode {p.decode}", flush=True)
    try:
        p.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    p.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
