"""Docker HEALTHCHECK: exit 0 when the service's /healthz answers 200 with status "ok" (stdlib only: no curl here).

A container whose host check failed answers /healthz 200 with status "host_check_failed" (alive, so Kubernetes'
liveness probe leaves it alone; see deploy/host_check.py): Docker marks it unhealthy, with the reason.
"""
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.request

PORT = os.environ.get("CONVNEXT_PORT", "8000")
# No proxy: Docker passes its client's proxies (~/.docker/config.json) into every container as HTTP_PROXY/http_proxy,
# which urlopen honours; the proxy cannot reach this container's loopback, and a healthy service would read unhealthy.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe_host(listen_host: str) -> str:
    """The URL host that reaches a service listening on `listen_host`: 127.0.0.1 for every interface ("0.0.0.0", or
    "::", which the service binds for IPv4 too), else the address or name it listens on (::1 answers on IPv6 only)."""
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:  # a name, e.g. localhost
        return listen_host or "127.0.0.1"
    if address.is_unspecified:
        return "127.0.0.1"
    return f"[{address}]" if address.version == 6 else str(address)


HOST = probe_host(os.environ.get("CONVNEXT_HOST", "0.0.0.0"))
try:
    with DIRECT.open(f"http://{HOST}:{PORT}/healthz", timeout=2) as response:
        body = json.loads(response.read() or b"{}")
except (urllib.error.URLError, OSError, ValueError) as error:
    print(f"healthz failed: {error}", file=sys.stderr)
    sys.exit(1)
if body.get("status") != "ok":
    print(f"healthz: {body.get('status')}: {body.get('reason', '')}", file=sys.stderr)
    sys.exit(1)
sys.exit(0)
