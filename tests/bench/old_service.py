"""A stand-in for the service of an older tree (0d55a45, the README's before/after): `python -m service` there answers
/readyz and POST /classify, whose timings are queue_ms, inference_ms and total_ms only (no preprocess_ms). With
`--refuse-first N` it answers its first N POSTs 503, as a busy service does.

tests/bench/test_compare_service_trees.py copies this file into a tree of its own as service/__main__.py."""
from __future__ import annotations

import itertools
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OLD_ANSWER = json.dumps({"model": {"name": "m", "version": 1}, "results": [
    {"filename": "image", "top_k": [], "timings": {"queue_ms": 0.1, "inference_ms": 5.0, "total_ms": 6.0},
     "batch_size": 1}]}).encode()


class OldService(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the benches' clients expect
    server: OldServer

    def do_GET(self):
        self._answer(200 if self.path == "/readyz" else 404, b"")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if next(self.server.posts) < self.server.refuse_first:
            self._answer(503, b'{"error": {"code": "queue_full", "message": "busy"}}')
        else:
            self._answer(200 if self.path == "/classify" else 404, OLD_ANSWER)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


class OldServer(ThreadingHTTPServer):
    def __init__(self, port: int, refuse_first: int):
        super().__init__(("127.0.0.1", port), OldService)
        self.refuse_first = refuse_first
        self.posts = itertools.count()  # next() is atomic under the GIL: the handler threads share it


def serve(port: int, refuse_first: int = 0) -> OldServer:
    return OldServer(port, refuse_first)


def flag_value(name: str, default: int) -> int:
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


if __name__ == "__main__":  # of the flags the script passes, only these matter here
    serve(flag_value("--port", 8000), flag_value("--refuse-first", 0)).serve_forever()
