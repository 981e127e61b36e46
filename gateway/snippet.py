"""GET /v1/a.js: the browser snippet, minified once when the gateway starts.

The readable source is `snippet.js` beside this module; rjsmin (a small C-accelerated minifier
from PyPI, no Node and no network) strips it at start, so what is served can never lag behind
the source. `/v1` is the snippet's major version: changes within it stay compatible, so the
file is cached for a day and revalidated with its ETag (a 304 costs a few bytes).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import rjsmin
from starlette.requests import Request
from starlette.responses import Response

SOURCE = Path(__file__).with_name("snippet.js")
CACHE_CONTROL = "public, max-age=86400, stale-while-revalidate=604800"


@dataclass(frozen=True, slots=True)
class Snippet:
    """The served bytes, plain and gzipped, and their ETag."""

    minified: bytes
    gzipped: bytes
    etag: str


@cache
def build() -> Snippet:
    """Minify `snippet.js` (keeping its /*! banner) and gzip it once per process."""
    minified = rjsmin.jsmin(SOURCE.read_text(encoding="utf-8"), keep_bang_comments=True)
    body = minified.strip().encode("utf-8") + b"\n"
    # Weak: the plain and the gzipped bytes are the same script, so they share one tag.
    etag = 'W/"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return Snippet(body, gzip.compress(body, 9, mtime=0), etag)


def _matches(if_none_match: str, etag: str) -> bool:
    # If-None-Match compares weakly (RFC 9110 13.1.2): W/ prefixes do not matter.
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


async def serve(request: Request) -> Response:
    """The minified snippet (gzipped when the client takes it), or 304 for a current ETag."""
    snippet = build()
    headers = {
        "cache-control": CACHE_CONTROL,
        "etag": snippet.etag,
        "vary": "Accept-Encoding",
        # Readable cross-origin, for sites that load their scripts with `crossorigin`.
        "access-control-allow-origin": "*",
        "cross-origin-resource-policy": "cross-origin",
        "x-content-type-options": "nosniff",
    }
    if _matches(request.headers.get("if-none-match", ""), snippet.etag):
        return Response(status_code=304, headers=headers)
    body = snippet.minified
    if "gzip" in request.headers.get("accept-encoding", ""):
        body = snippet.gzipped
        headers["content-encoding"] = "gzip"
    return Response(body, 200, headers, media_type="text/javascript; charset=utf-8")
