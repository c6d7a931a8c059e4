"""A toy server for bench.server_process's tests: `python -m tests.bench.toy_server --port P [--exit-code N]`."""
from __future__ import annotations

import argparse
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exit-code", type=int, default=None, help="say so on stdout and exit before serving")
    parser.add_argument("--never-ready", action="store_true", help="/readyz answers 503 forever")
    args = parser.parse_args()
    print(f"toy server starting on port {args.port}", flush=True)
    if args.exit_code is not None:
        print("toy server: refusing to start", flush=True)
        return args.exit_code
    ready_status = 503 if args.never_ready else 200

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(ready_status if self.path == "/readyz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):  # keep the log to what the test looks for
            pass

    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
