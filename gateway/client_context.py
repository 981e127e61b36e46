"""The request's end-user context: client IP, User-Agent and edge country.

X-Forwarded-For is believed only when the peer is a configured trusted proxy; then the client is
the right-most address that is not itself a trusted proxy (the left part is client-controlled).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from ingest.records import Context


class ClientContext:
    """Builds the raw record's `context` from a request."""

    def __init__(self, trusted_proxies: Iterable[str], edge_country_header: str | None) -> None:
        self._proxies = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies)
        self._country_header = edge_country_header.lower() if edge_country_header else None

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    def client_ip(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The end user's IP as far as we can trust it (`peer`: the TCP peer's address)."""
        if peer is None or not self._proxies or not self._trusted(peer):
            return peer
        forwarded = headers.get("x-forwarded-for")
        if not forwarded:
            return peer
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            if hop and not self._trusted(hop):
                return hop
        return peer

    def build(self, peer: str | None, headers: Mapping[str, str]) -> Context:
        """The context of one request (`headers` with lower-case names)."""
        ctx: Context = {}
        if ip := self.client_ip(peer, headers):
            ctx["ip"] = ip
        if ua := headers.get("user-agent"):
            ctx["user_agent"] = ua[:2048]
        if self._country_header and (country := headers.get(self._country_header)):
            ctx["country"] = country[:8]
        return ctx
