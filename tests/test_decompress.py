"""`Content-Encoding: gzip` on the ingest routes: inflated under the route's limit, bombs refused
with 413 while inflating, corrupt streams 400, other encodings 415."""

from __future__ import annotations

import gzip
import tracemalloc
import uuid

import orjson
import pytest

from gateway.decompress import decode_body
from gateway.validate import InvalidBody
from tests.test_gateway import JSON, Gw, check_accepted, check_error, gw, raw_records

__all__ = ["gw"]  # the module fixture, shared with test_gateway.py

GZIP = JSON | {"content-encoding": "gzip"}
MIB = 1024 * 1024


def test_identity_and_gzip_give_the_same_body() -> None:
    body = orjson.dumps({"events": [{"event": "a"}] * 100})
    assert decode_body(None, body, MIB) == body
    assert decode_body("identity", body, MIB) == body
    assert decode_body("GZIP", gzip.compress(body), MIB) == body
    two_members = gzip.compress(body[:50]) + gzip.compress(body[50:])
    assert decode_body("gzip", two_members, MIB) == body


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (200 * MIB), compresslevel=9)
    assert len(bomb) < MIB // 2  # it passes the route's limit on the wire
    tracemalloc.start()
    try:
        with pytest.raises(InvalidBody) as refused:
            decode_body("gzip", bomb, MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "payload_too_large"
    assert peak < 4 * MIB  # the limit plus a chunk, not the 200 MiB it would inflate to


def test_the_limit_is_on_the_inflated_size() -> None:
    body = b"x" * 1000
    assert decode_body("gzip", gzip.compress(body), 1000) == body
    with pytest.raises(InvalidBody) as refused:
        decode_body("gzip", gzip.compress(body + b"x"), 1000)
    assert refused.value.code == "payload_too_large"


@pytest.mark.parametrize(
    "stream",
    [b"not gzip at all", gzip.compress(b'{"events": []}')[:-6], b"\x1f\x8b\x08\x00broken"],
    ids=["not-gzip", "truncated", "corrupt"],
)
def test_a_bad_stream_is_invalid_gzip(stream: bytes) -> None:
    with pytest.raises(InvalidBody) as refused:
        decode_body("gzip", stream, MIB)
    assert refused.value.code == "invalid_gzip"


def test_other_encodings_are_unsupported() -> None:
    for encoding in ("br", "deflate", "zstd", "gzip, br"):
        with pytest.raises(InvalidBody) as refused:
            decode_body(encoding, b"{}", MIB)
        assert refused.value.code == "unsupported_encoding"


async def test_a_gzip_batch_is_accepted_and_published(gw: Gw) -> None:
    events = [{"event": "zipped", "event_id": uuid.uuid4().hex} for _ in range(50)]
    body = gzip.compress(orjson.dumps({"events": events}))
    ids = check_accepted(await gw.post("/v1/batch", content=body, headers=GZIP), "batch")
    assert ids["event_ids"] == [e["event_id"] for e in events]
    records = await raw_records(gw.bootstrap, ids["event_ids"])
    assert {records[i]["event"] for i in ids["event_ids"]} == {"zipped"}


async def test_a_gzip_bomb_through_the_gateway_is_413(gw: Gw) -> None:
    bomb = gzip.compress(b'{"events": [' + b" " * (64 * MIB) + b"]}", compresslevel=9)
    r = await gw.post("/v1/batch", content=bomb, headers=GZIP)
    check_error(r, "payload_too_large", "batch")
    small = gzip.compress(orjson.dumps({"event": "a", "url": "x" * 40_000}))
    check_error(await gw.post("/v1/track", content=small, headers=GZIP), "payload_too_large")
