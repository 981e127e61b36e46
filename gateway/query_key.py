"""The key a browser beacon carries in the URL (`?key=pk_...`): `navigator.sendBeacon` cannot set
an Authorization header, so pk_ keys, which are public by design, may travel in the query string.

sk_ and rk_ keys never may: a URL is logged and shared, so one found there is refused outright,
even beside a valid header. The Origin allowlist applies as it does to a header's key.

Segment's and RudderStack's SDKs send the key as HTTP Basic credentials (`key:`, empty password);
that header is read as `Bearer key`, so every key rule applies to it unchanged.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qs

from gateway.auth import AuthError


def _basic_as_bearer(header: str | None) -> str | None:
    """`Basic base64(key:)` as `Bearer key`; anything else (a password too) unchanged."""
    if header is None or header[:6].lower() != "basic ":
        return header
    try:
        user, colon, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return header
    if not colon or password or not user.isascii():
        return header  # authenticate() refuses it as malformed_api_key
    return f"Bearer {user.decode('ascii')}"


def authorization(header: str | None, query_string: bytes) -> str | None:
    """The request's Authorization value: its header (Basic read as Bearer), else
    `Bearer <pk_ key from ?key=>`."""
    header = _basic_as_bearer(header)
    if not query_string:
        return header
    keys = parse_qs(query_string.decode("latin-1")).get("key", [])
    if any(not key.startswith("pk_") for key in keys):
        raise AuthError("secret_key_in_url")
    if header or not keys:
        return header
    return f"Bearer {keys[0]}"
