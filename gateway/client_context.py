"""The request's end-user context: client IP, User-Agent and edge country.

X-Forwarded-For is believed only when the peer is a configured trusted proxy; then the client is
the right-most address that is not itself a trusted proxy (the left part is client-controlled).
Repeated X-Forwarded-For lines count as one list, in order (a proxy may add its own line after
the client's), and IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, a dual-stack socket's view of
an IPv4 peer) are their IPv4 address. The edge country header, like X-Forwarded-For, is
believed only from a trusted proxy: anyone else could set it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from ingest.records import Context

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """The address in `text`, IPv4-mapped IPv6 as IPv4; None when it is not an address."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientContext:
    """Builds the raw record's `context` from a request."""

    def __init__(self, trusted_proxies: Iterable[str], edge_country_header: str | None) -> None:
        self._proxies = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies)
        self._country_header = edge_country_header.lower() if edge_country_header else None

    def _trusted(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self._proxies)

    def client_ip(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The end user's IP as far as we can trust it (`peer`: the TCP peer's address;
        `headers`: lower-case names, repeated X-Forwarded-For lines joined with commas)."""
        if peer is None:
            return None
        peer_ip = parse_ip(peer)
        shown = str(peer_ip) if peer_ip is not None else peer
        forwarded = headers.get("x-forwarded-for")
        if not forwarded or not self._trusted(peer_ip):
            return shown
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            if not hop:
                continue
            hop_ip = parse_ip(hop)
            if not self._trusted(hop_ip):
                return str(hop_ip) if hop_ip is not None else hop
        return shown

    def build(self, peer: str | None, headers: Mapping[str, str]) -> Context:
        """The context of one request (`headers` with lower-case names)."""
        ctx: Context = {}
        if ip := self.client_ip(peer, headers):
            ctx["ip"] = ip
        if ua := headers.get("user-agent"):
            ctx["user_agent"] = ua[:2048]
        if (
            self._country_header
            and (country := headers.get(self._country_header))
            and peer is not None
            and self._trusted(parse_ip(peer))
        ):
            ctx["country"] = country[:8]
        return ctx
