"""Docker HEALTHCHECK: exit 0 when the service's /healthz answers 200 with status "ok" (stdlib only: no curl here).

A container whose host check failed answers /healthz 200 with status "host_check_failed" (alive, so Kubernetes'
liveness probe leaves it alone; see deploy/host_check.py): Docker marks it unhealthy, with the reason.
"""
import json
import os
import sys
import urllib.error
import urllib.request

PORT = os.environ.get("CONVNEXT_PORT", "8000")
# No proxy: Docker passes its client's proxies (~/.docker/config.json) into every container as HTTP_PROXY/http_proxy,
# which urlopen honours; the proxy cannot reach this container's 127.0.0.1, and a healthy service would read unhealthy.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

try:
    with DIRECT.open(f"http://127.0.0.1:{PORT}/healthz", timeout=2) as response:
        body = json.loads(response.read() or b"{}")
except (urllib.error.URLError, OSError, ValueError) as error:
    print(f"healthz failed: {error}", file=sys.stderr)
    sys.exit(1)
if body.get("status") != "ok":
    print(f"healthz: {body.get('status')}: {body.get('reason', '')}", file=sys.stderr)
    sys.exit(1)
sys.exit(0)
