"""The key a browser beacon carries in the URL (`?key=pk_...`): `navigator.sendBeacon` cannot set
an Authorization header, so pk_ keys, which are public by design, may travel in the query string.

sk_ and rk_ keys never may: a URL is logged and shared, so one found there is refused outright,
even beside a valid header. The Origin allowlist applies as it does to a header's key.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from gateway.auth import AuthError


def authorization(header: str | None, query_string: bytes) -> str | None:
    """The request's Authorization value: its header, else `Bearer <pk_ key from ?key=>`."""
    if not query_string:
        return header
    keys = parse_qs(query_string.decode("latin-1")).get("key", [])
    if any(not key.startswith("pk_") for key in keys):
        raise AuthError("secret_key_in_url")
    if header or not keys:
        return header
    return f"Bearer {keys[0]}"
