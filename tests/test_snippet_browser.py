"""The snippet in a real browser: Debian's Chromium, driven by Selenium through Debian's
chromedriver, loads pages from a local test site whose script tag points at a running pipeline,
and the rows are read back from ClickHouse.

One browser, one pipeline and one site serve the whole module (starting them is most of the
cost); each test uses its own paths so that their rows do not mix.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.key_admin import create_key
from millimetric_app.embedded import free_port
from tests.services import Pipeline, kafka_broker, not_ready

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed (tests/run.sh installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 (only once the browser is known to exist)
from selenium.webdriver.chrome.service import Service  # noqa: E402

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROJECT = "snippet"
LANDING = "/landing?utm_source=newsletter&utm_medium=email"


@dataclass
class Site:
    """A local test site: HTML pages by path, plus a scripted stand-in for the gateway's
    /v1/batch (answers popped from `answers`, bodies kept in `received`)."""

    port: int
    pages: dict[str, str] = field(default_factory=dict)
    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The page's URL; host `localhost` is another origin, not on the key's allowlist."""
        return f"http://{host}:{self.port}{path}"


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            page = site.pages.get(self.path.split("?")[0])
            self._answer(200 if page else 404, (page or "").encode(), "text/html")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            site.received.append(json.loads(body))
            status, answer = site.answers.pop(0) if site.answers else (202, {"ok": True})
            self._answer(status, json.dumps(answer).encode(), "application/json")

        def _answer(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.send_header("access-control-allow-origin", self.headers.get("origin") or "*")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """The test site on its own loopback port."""
    s = Site(free_port())
    server = ThreadingHTTPServer(("127.0.0.1", s.port), _handler(s))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield s
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def pipeline(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """Broker, gateway, processor, sink (chdb), with a pk_ key for the site's 127.0.0.1 origin."""
    with kafka_broker() as bootstrap:
        p = Pipeline(bootstrap, None, tmp_path_factory.mktemp("data")).start()
        try:
            origin = site.url("")
            p.key = asyncio.run(create_key(bootstrap, PROJECT, "pk", "live", [origin]))
            headers = {"origin": origin, "authorization": f"Bearer {p.key}"}
            deadline = time.monotonic() + 60
            # Until the gateway has read the new key (an empty body is then a 400).
            while httpx.post(f"{p.base_url}/v1/track", json={}, headers=headers).status_code != 400:
                assert time.monotonic() < deadline, "the gateway never learnt the pk_ key"
                time.sleep(0.2)
            yield p
        finally:
            p.stop()


@contextmanager
def chrome(prefs: dict[str, Any] | None = None) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile, logging network events and the console."""
    profile = tempfile.mkdtemp(prefix="mm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    if prefs:
        options.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module."""
    with chrome() as driver:
        yield driver


def tag(pipeline: Pipeline, key: str | None = None, **attrs: str) -> str:
    """The snippet's script tag, as a site owner writes it."""
    extra = "".join(f' data-{name.replace("_", "-")}="{value}"' for name, value in attrs.items())
    src = f"{pipeline.base_url}/v1/a.js"
    return f'<script src="{src}" data-key="{key or pipeline.key}"{extra} defer></script>'


def serve(site: Site, path: str, head: str, body: str = "") -> None:
    """Put a page on the test site."""
    title = path.strip("/").split("?")[0] or "home"
    site.pages[path.split("?")[0]] = (
        f"<!doctype html><html><head><title>{title}</title>{head}</head><body>{body}</body></html>"
    )


def rows(pipeline: Pipeline, columns: str, where: str, count: int) -> list[list[str]]:
    """This project's rows matching `where`, once there are `count` of them (60 s at most)."""
    query = f"SELECT {columns} FROM events FINAL WHERE project = '{PROJECT}' AND ({where})"
    deadline = time.monotonic() + 60
    out: list[list[str]] = []
    while len(out) < count and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            lines = pipeline.sql(f"{query} ORDER BY timestamp").splitlines()
        except RuntimeError as error:  # only "the sink is still starting" is polled through
            if not not_ready(str(error)):
                raise
            continue
        out = [line.split("\t") for line in lines]
    if count == 0:
        out = [line.split("\t") for line in pipeline.sql(query).splitlines()]
    assert len(out) == count, out
    return out


def network(driver: webdriver.Chrome) -> list[tuple[str, dict[str, Any]]]:
    """DevTools network events (method, params) logged since the last call."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"].startswith("Network."):
            out.append((message["method"], message.get("params", {})))
    return out


def sent(driver: webdriver.Chrome, base: str) -> set[str]:
    """Paths of the requests to `base` since the last call (a cached a.js is not one)."""
    urls = [p["request"]["url"] for m, p in network(driver) if m == "Network.requestWillBeSent"]
    return {url[len(base) :].split("?")[0] for url in urls if url.startswith(base)}


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    """Poll `check` until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_page_views_track_and_spa_navigation(
    browser: webdriver.Chrome, pipeline: Pipeline, site: Site
) -> None:
    serve(site, "/landing", tag(pipeline))
    serve(site, "/from", "", f'<a id="go" href="{site.url(LANDING)}">go</a>')
    browser.get(site.url("/from", host="localhost"))  # another origin: the referrer
    browser.find_element("id", "go").click()
    wait_for(lambda: browser.execute_script("return !!(window.millimetric || {}).version"))
    event_id = browser.execute_script("return millimetric.track('signup', {plan: 'free'})")
    browser.execute_script("history.pushState({}, '', '/pricing?tab=2')")
    browser.execute_script("history.replaceState({}, '', '/pricing?tab=2#faq')")  # same page
    browser.execute_script("millimetric.identify('user_42', {plan: 'pro'})")
    browser.execute_script("millimetric.track('upgraded')")

    views = rows(
        pipeline,
        "url, path, referrer, source, medium, channel, properties, anonymous_id",
        "event = '$pageview' AND path IN ('/landing', '/pricing')",
        2,
    )
    landing, pricing = views
    assert landing[:6] == [
        site.url(LANDING),
        "/landing",
        site.url("/", host="localhost"),  # Chromium sends the origin to another origin
        "newsletter",
        "email",
        "Email",
    ]
    assert json.loads(landing[6]) == {"title": "landing"}
    assert pricing[:3] == [site.url("/pricing?tab=2"), "/pricing", site.url(LANDING)]
    tracked = rows(pipeline, "event_id, properties, anonymous_id, path", "event = 'signup'", 1)
    assert tracked == [[event_id, '{"plan":"free"}', landing[7], "/landing"]]
    assert len(landing[7]) == 32 and pricing[7] == landing[7]
    left = rows(pipeline, "path, properties", "event = '$pageleave' AND path = '/landing'", 1)
    assert json.loads(left[0][1])["duration_ms"] >= 0
    linked = rows(pipeline, "event, user_id, anonymous_id", "event IN ('$identify', 'upgraded')", 2)
    assert sorted(linked) == [
        ["$identify", "user_42", landing[7]],
        ["upgraded", "user_42", landing[7]],
    ]
    stored = browser.execute_script("return localStorage.getItem('mm_aid')")
    assert stored == landing[7]
    browser.execute_script("millimetric.reset()")
    assert browser.execute_script("return localStorage.getItem('mm_uid')") is None
    assert browser.execute_script("return localStorage.getItem('mm_aid')") not in (None, stored)


def test_closing_the_tab_sends_what_is_queued(
    browser: webdriver.Chrome, pipeline: Pipeline, site: Site
) -> None:
    serve(site, "/closing", tag(pipeline))
    home = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(site.url("/closing"))
    wait_for(lambda: browser.execute_script("return !!(window.millimetric || {}).version"))
    # Queued for a second's batching; the tab closes first, so the beacon must carry it.
    browser.execute_script("millimetric.track('last_words')")
    browser.close()
    browser.switch_to.window(home)
    rows(pipeline, "event", "event = 'last_words'", 1)
    rows(pipeline, "event", "event = '$pageleave' AND path = '/closing'", 1)


def test_retries_429_and_503_then_drops_a_4xx_with_a_warning(
    browser: webdriver.Chrome, pipeline: Pipeline, site: Site
) -> None:
    serve(site, "/retry", tag(pipeline, host=site.url("")))  # the site stands in for the gateway
    site.received.clear()
    site.answers[:] = [(503, {"ok": False}), (429, {"ok": False}), (202, {"ok": True})]
    browser.get(site.url("/retry"))
    wait_for(lambda: len(site.received) == 3)
    ids = [[e["event_id"] for e in body["events"]] for body in site.received]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 1  # the same page view, three times
    # A clock the server refuses: sent again at once, without the browser's timestamp.
    clock = {"index": 0, "field": "timestamp", "message": "too far in the future"}
    refused = {"ok": False, "error": "invalid_payload", "message": "bad", "details": [clock]}
    site.answers[:] = [(400, refused)]
    browser.execute_script("millimetric.track('late_clock')")
    wait_for(lambda: len(site.received) == 5)
    first, again = (body["events"][0] for body in site.received[3:])
    assert first["event_id"] == again["event_id"] and "timestamp" in first
    assert "timestamp" not in again
    site.answers[:] = [(400, {"ok": False, "error": "invalid_payload", "message": "bad"})]
    browser.get_log("browser")
    browser.execute_script("millimetric.track('refused')")
    wait_for(lambda: len(site.received) == 6)
    time.sleep(3)  # past the first backoff: a dropped event is not sent again
    assert len(site.received) == 6
    logs = [e["message"] for e in browser.get_log("browser")]
    assert any("dropped 1 event(s): invalid_payload: bad" in m for m in logs), logs


def test_do_not_track_and_gpc_send_nothing_unless_the_site_opts_out(
    browser: webdriver.Chrome, pipeline: Pipeline, site: Site
) -> None:
    serve(site, "/gpc", tag(pipeline))
    serve(site, "/gpc-ignored", tag(pipeline, dnt="ignore"))
    # GPC as a browser extension provides it: navigator.globalPrivacyControl before any script.
    gpc = "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": gpc})
    try:
        network(browser)
        browser.get(site.url("/gpc"))
        assert browser.execute_script("return navigator.globalPrivacyControl") is True
        wait_for(lambda: browser.execute_script("return !!(window.millimetric || {}).version"))
        browser.execute_script("millimetric.track('gpc_event')")
        browser.get(site.url("/gpc-ignored"))  # leaving /gpc would flush anything queued
        rows(pipeline, "path", "event = '$pageview' AND path = '/gpc-ignored'", 1)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", added)
    assert sent(browser, pipeline.base_url) - {"/v1/a.js"} == {"/v1/batch"}  # /gpc-ignored's
    assert browser.execute_script("return localStorage.getItem('mm_aid')") is not None

    # Do-Not-Track, as the browser's own setting, in a browser of its own.
    serve(site, "/dnt", tag(pipeline))
    with chrome({"enable_do_not_track": True}) as dnt:
        dnt.get(site.url("/dnt"))
        assert dnt.execute_script("return navigator.doNotTrack") == "1"
        wait_for(lambda: dnt.execute_script("return !!(window.millimetric || {}).version"))
        dnt.execute_script("millimetric.track('dnt_event')")
        storage = dnt.execute_script("return [localStorage.length, document.cookie]")
        dnt.get("about:blank")
        assert storage == [0, ""]
        assert sent(dnt, pipeline.base_url) == {"/v1/a.js"}
    none = "path IN ('/gpc', '/dnt') OR event IN ('gpc_event', 'dnt_event')"
    assert rows(pipeline, "event", none, 0) == []


def test_other_origins_and_secret_keys_are_refused(
    browser: webdriver.Chrome, pipeline: Pipeline, site: Site
) -> None:
    serve(site, "/foreign", tag(pipeline))
    network(browser)
    browser.get(site.url("/foreign", host="localhost"))  # not on the key's allowlist
    statuses: list[int] = []

    def refused() -> bool:
        for method, params in network(browser):
            if method == "Network.responseReceivedExtraInfo":
                statuses.append(params.get("statusCode", 0))
        return 403 in statuses

    wait_for(refused)
    browser.get("about:blank")  # stop its retries

    sk = asyncio.run(create_key(pipeline.bootstrap, PROJECT, "sk", "live", []))
    serve(site, "/secret", tag(pipeline, key=sk))
    browser.get_log("browser")
    browser.get(site.url("/secret"))
    wait_for(lambda: browser.execute_script("return !!(window.millimetric || {}).version"))
    browser.execute_script("millimetric.track('secret_event')")
    logs = [e["message"] for e in browser.get_log("browser")]
    assert any("data-key must be a pk_ key; this secret key is exposed" in m for m in logs), logs
    browser.get("about:blank")
    assert "/v1/batch" not in sent(browser, pipeline.base_url)
    # A hand-made beacon with the sk_ key is refused by the gateway too.
    r = httpx.post(
        f"{pipeline.base_url}/v1/batch?key={sk}",
        content=b'{"events": [{"event": "secret_event"}]}',
        headers={"content-type": "text/plain", "origin": site.url("")},
    )
    assert r.status_code == 403 and r.json()["error"] == "secret_key_in_url"
    # Refused at once (403) or never sent: no row can come later.
    where = "path IN ('/foreign', '/secret') OR event = 'secret_event'"
    assert rows(pipeline, "event", where, 0) == []
