"""Docker HEALTHCHECK: exit 0 when the service's /healthz answers 200 (stdlib only: the images carry no curl)."""
import os
import sys
import urllib.error
import urllib.request

PORT = os.environ.get("CONVNEXT_PORT", "8000")

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as error:
    print(f"healthz failed: {error}", file=sys.stderr)
    sys.exit(1)
