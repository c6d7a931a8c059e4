"""The service's API key on the bench's side: where `bench load` takes it from, the header it goes in, and what a
refused one looks like."""
from __future__ import annotations

import os
from collections.abc import Mapping

API_KEY_VARIABLE = "CONVNEXT_API_KEY"  # the service's own setting: one exported key serves both
API_KEY_HEADER = "X-API-Key"  # one of the two headers the service takes a key from (service/api_keys.py)
REFUSED_STATUSES = frozenset({"401", "403"})  # the service's 401, or a proxy's 403 in front of it


def api_key_from(flag: str | None) -> str | None:
    """--api-key, else $CONVNEXT_API_KEY (empty: none), stripped as the service strips it (a Kubernetes secret from a
    file ends in a newline); a ValueError, never echoing it, for one no header can hold."""
    api_key = flag if flag is not None else os.environ.get(API_KEY_VARIABLE)
    api_key = api_key.strip() if api_key is not None else None
    if api_key and not api_key.isprintable():
        raise ValueError(f"the API key (--api-key or {API_KEY_VARIABLE}) holds a line break or another control "
                         "character, which an HTTP header cannot carry")
    return api_key or None


def what_to_check(errors: Mapping[str, int], api_key: str | None) -> str:
    """The likely cause of a load run in which no request succeeded, from its errors by status: the key when the
    service refused it, else whether it listens there."""
    if not REFUSED_STATUSES & set(errors):
        return "check that the service is listening there (convnext serve) and the URL's path"
    if api_key:
        return f"the service refused the API key sent (--api-key or {API_KEY_VARIABLE}): check that it is the service's"
    return f"the service wants an API key: set {API_KEY_VARIABLE} (as for the service) or pass --api-key"
