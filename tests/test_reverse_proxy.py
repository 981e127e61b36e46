"""The gateway behind a real reverse proxy (Debian's haproxy, started here on loopback): the client
IP and the edge country are believed only as far as the proxies are trusted.

The client connects from 127.0.0.2, haproxy from 127.0.0.1 (the one trusted proxy). IPv4-mapped
peers (what a dual-stack socket shows for IPv4 clients) are checked on ClientContext itself:
asyncio's listening sockets are IPv6-only.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.client_context import ClientContext
from gateway.key_admin import create_key
from millimetric_app.embedded import free_port, wait_for_port
from tests.test_gateway import raw_records
from tests.test_gateway_processes import GatewayProcess, wait

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT_ADDRESS = "127.0.0.2"
FORGED = "198.51.100.66"

HAPROXY_CONFIG = """
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend edge
  bind 127.0.0.1:{port}
  option forwardfor
  http-request set-header X-Edge-Country FR
  default_backend gateway
backend gateway
  server gw 127.0.0.1:{gateway_port} source 127.0.0.1
"""


@pytest.fixture(scope="module")
def behind_haproxy(
    broker: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, str, str]]:
    """A gateway trusting 127.0.0.1 only, haproxy in front of it, and an sk_ key."""
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (tests/run.sh installs it)")
    root = tmp_path_factory.mktemp("haproxy")
    gw = GatewayProcess(
        broker,
        root / "gw",
        trusted_proxies='["127.0.0.1/32"]',
        edge_country_header="X-Edge-Country",
    ).start()
    port = free_port()
    config = root / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, gateway_port=gw.port))
    log = (root / "haproxy.log").open("wb")
    proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=log)
    try:
        wait_for_port(port)
        gw.wait_ready()
        key = asyncio.run(create_key(broker, f"proxy-{uuid.uuid4().hex[:8]}", "sk", "live", []))
        wait(lambda: gw.knows(key))
        yield gw, f"http://127.0.0.1:{port}", key
    finally:
        proxy.terminate()
        proxy.wait(30)
        log.close()
        gw.stage.stop()


def _context(broker: str, base_url: str, key: str, headers: list[tuple[str, str]]) -> Any:
    """Track one event from 127.0.0.2 and return the context the gateway recorded for it."""
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    with httpx.Client(transport=transport, timeout=30) as client:
        r = client.post(
            f"{base_url}/v1/track",
            json={"event": "e"},
            headers=[("authorization", f"Bearer {key}"), *headers],
        )
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]
    return asyncio.run(raw_records(broker, [event_id]))[event_id]["context"]


def test_a_forged_x_forwarded_for_line_is_not_believed(
    broker: str, behind_haproxy: tuple[GatewayProcess, str, str]
) -> None:
    _, proxy_url, key = behind_haproxy
    # haproxy adds its own X-Forwarded-For line after the client's forged one.
    ctx = _context(broker, proxy_url, key, [("x-forwarded-for", FORGED)])
    assert ctx["ip"] == CLIENT_ADDRESS
    ctx = _context(broker, proxy_url, key, [])
    assert ctx["ip"] == CLIENT_ADDRESS


def test_the_edge_country_is_believed_only_from_the_proxy(
    broker: str, behind_haproxy: tuple[GatewayProcess, str, str]
) -> None:
    gw, proxy_url, key = behind_haproxy
    assert _context(broker, proxy_url, key, [("x-edge-country", "XX")])["country"] == "FR"
    direct = _context(broker, gw.url, key, [("x-edge-country", "XX"), ("x-forwarded-for", FORGED)])
    assert "country" not in direct  # the client itself is no edge
    assert direct["ip"] == CLIENT_ADDRESS  # nor a proxy


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("::ffff:10.0.0.5", "203.0.113.7", "203.0.113.7"),
        ("10.0.0.5", "198.51.100.66, 203.0.113.7, 10.0.0.9", "203.0.113.7"),
        ("10.0.0.5", "::ffff:10.0.0.9", "10.0.0.5"),
        ("192.0.2.1", "203.0.113.7", "192.0.2.1"),
        ("::ffff:192.0.2.1", "203.0.113.7", "192.0.2.1"),
    ],
)
def test_client_ip(peer: str, forwarded: str, client: str) -> None:
    context = ClientContext(["10.0.0.0/8"], None)
    assert context.client_ip(peer, {"x-forwarded-for": forwarded}) == client
