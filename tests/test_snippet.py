"""GET /v1/a.js and the key in the URL, in process against the real broker: the served snippet is
the minified source, cached by ETag; a pk_ key may travel as `?key=` (with its Origin allowlist),
an sk_ or rk_ key there is refused. The browser side is in test_snippet_browser.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import rjsmin

from gateway.snippet import SOURCE, build
from tests import test_gateway
from tests.test_gateway import ORIGIN, Gw, check_accepted, check_error

BEACON = {"content-type": "text/plain;charset=UTF-8", "origin": ORIGIN}


# test_gateway's gateway fixture (its project has an sk_, an rk_ and a pk_ key allowing ORIGIN),
# started again for this module.
gw = test_gateway.gw


async def test_a_js_is_the_minified_source_gzipped_and_cached_by_etag(gw: Gw) -> None:
    r = await gw.client.get("/v1/a.js", headers={"accept-encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    source = SOURCE.read_text()
    assert r.text.strip() == rjsmin.jsmin(source, keep_bang_comments=True).strip()
    assert len(r.content) < len(source.encode()) * 0.8 and "//" not in r.text.split("*/", 1)[1]
    assert "max-age=86400" in r.headers["cache-control"]
    etag = r.headers["etag"]
    zipped = await gw.client.get("/v1/a.js", headers={"accept-encoding": "gzip, br"})
    assert zipped.headers["content-encoding"] == "gzip" and zipped.headers["etag"] == etag
    assert zipped.content == r.content  # httpx decoded it
    assert gzip.decompress(build().gzipped) == r.content
    size = f"**{len(r.content)} bytes minified, {len(build().gzipped)} bytes gzipped**"
    assert size in (Path(__file__).parents[1] / "README.md").read_text(), "README: update the size"
    assert etag.startswith('W/"')
    for tags in (etag, f'"other", {etag.removeprefix("W/")}', "*"):
        again = await gw.client.get("/v1/a.js", headers={"if-none-match": tags})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    stale = await gw.client.get("/v1/a.js", headers={"if-none-match": '"old"'})
    assert stale.status_code == 200


async def test_a_beacon_with_a_pk_key_in_the_url_is_accepted_from_its_origin(gw: Gw) -> None:
    body = b'{"events": [{"event": "$pageview", "url": "https://site.example/"}]}'
    r = await gw.client.post(f"/v1/batch?key={gw.pk}", content=body, headers=BEACON)
    check_accepted(r, "batch")
    assert r.headers["access-control-allow-origin"] == ORIGIN
    elsewhere = {**BEACON, "origin": "https://evil.example"}
    r = await gw.client.post(f"/v1/batch?key={gw.pk}", content=body, headers=elsewhere)
    check_error(r, "origin_not_allowed", "batch")
    r = await gw.client.post(
        f"/v1/track?key={gw.pk}", content=b'{"event": "a"}', headers={"origin": ORIGIN}
    )
    check_error(r, "unsupported_media_type", "track")
    r = await gw.client.post("/v1/track?key=pk_live_short", content=b"{}", headers=BEACON)
    check_error(r, "malformed_api_key", "track")


@pytest.mark.parametrize("kind", ["sk", "rk"])
async def test_a_secret_key_in_the_url_is_refused(gw: Gw, kind: str) -> None:
    key = gw.sk if kind == "sk" else gw.rk
    body = b'{"events": [{"event": "a"}]}'
    for headers in (BEACON, {**BEACON, "authorization": f"Bearer {gw.pk}"}):
        r = await gw.client.post(f"/v1/batch?key={key}", content=body, headers=headers)
        check_error(r, "secret_key_in_url", "batch")
    r = await gw.client.get(f"/v1/forget/fgt_x?key={key}")
    check_error(r, "secret_key_in_url")
