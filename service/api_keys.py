"""API keys without the web stack: which key the admin side wants and whether a request's headers carry a key. The
standard library and the settings only, so the train image's entrypoint (no FastAPI there: deploy/host_check.py's
fallback server) checks keys exactly as the service does (service/security.py)."""
from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def admin_key(settings: Settings) -> str | None:
    """The key /admin wants: admin_api_key when set, else api_key; None when neither is."""
    secret = settings.admin_api_key if settings.admin_api_key is not None else settings.api_key
    return secret.get_secret_value() if secret is not None else None


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Every key the request carries (X-API-Key, Authorization: Bearer). Authorization in another scheme is not ours:
    a proxy's HTTP Basic login (nginx auth_basic passes it on, and browsers re-send it on every same-origin request)."""
    keys = []
    for name, value in headers:
        if name == b"x-api-key":
            keys.append(value.strip())
        elif name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                keys.append(token.strip())
    return keys


def key_accepted(headers: list[tuple[bytes, bytes]], api_key: bytes) -> bool:
    """Every key presented must be the key: a wrong one beside a right one is still a wrong one."""
    keys = presented_keys(headers)
    return bool(keys) and all(hmac.compare_digest(key, api_key) for key in keys)
