"""A stand-in for the service of an older tree (0d55a45, the README's before/after): `python -m service` there answers
/readyz and POST /classify, whose timings are queue_ms, inference_ms and total_ms only (no preprocess_ms).

tests/bench/test_compare_service_trees.py copies this file into a tree of its own as service/__main__.py."""
from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OLD_ANSWER = json.dumps({"model": {"name": "m", "version": 1}, "results": [
    {"filename": "image", "top_k": [], "timings": {"queue_ms": 0.1, "inference_ms": 5.0, "total_ms": 6.0},
     "batch_size": 1}]}).encode()


class OldService(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the benches' clients expect

    def do_GET(self):
        self._answer(200 if self.path == "/readyz" else 404, b"")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(200 if self.path == "/classify" else 404, OLD_ANSWER)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


def serve(port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer(("127.0.0.1", port), OldService)


if __name__ == "__main__":  # of the flags the script passes, only --port matters here
    serve(int(sys.argv[sys.argv.index("--port") + 1])).serve_forever()
