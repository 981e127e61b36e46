"""Content-Encoding of ingest bodies: identity or gzip, limited by the inflated size.

A gzip body is inflated incrementally and refused with 413 as soon as its output passes the
route's size limit, so a small bomb costs at most `limit` bytes of memory and the time to inflate
them. A corrupt or truncated stream is 400 `invalid_gzip`; any other encoding is 415
`unsupported_encoding`.
"""

from __future__ import annotations

import zlib

from gateway.validate import InvalidBody

IDENTITY = ("", "identity")
GZIP = ("gzip", "x-gzip")
GZIP_WBITS = 16 + zlib.MAX_WBITS  # the gzip container, not raw deflate or zlib
CHUNK = 64 * 1024  # inflate this much at a time: the limit check runs between chunks


def _gunzip(body: bytes, limit: int) -> bytes:
    out: list[bytes] = []
    size = 0
    data = body
    while data:  # concatenated gzip members are one valid gzip stream (RFC 1952)
        inflater = zlib.decompressobj(GZIP_WBITS)
        while not inflater.eof:
            try:
                chunk = inflater.decompress(data, CHUNK)
            except zlib.error as error:
                raise InvalidBody(
                    "invalid_gzip", [{"field": "(body)", "message": str(error)}]
                ) from None
            size += len(chunk)
            if size > limit:
                raise InvalidBody("payload_too_large")
            out.append(chunk)
            data = inflater.unconsumed_tail
            if not data and not chunk and not inflater.eof:
                raise InvalidBody("invalid_gzip", [{"field": "(body)", "message": "truncated"}])
        data = inflater.unused_data
    return b"".join(out)


def decode_body(content_encoding: str | None, body: bytes, limit: int) -> bytes:
    """The body as the route reads it: inflated if gzip, at most `limit` bytes either way."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in IDENTITY:
        return body
    if encoding in GZIP:
        return _gunzip(body, limit)
    raise InvalidBody("unsupported_encoding")
