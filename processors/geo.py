"""Country enrichment from a MaxMind-format database or a trusted CDN edge header.

Pure and synchronous (per-event hot path). Works with any database whose records carry
``{"country": {"iso_code": ...}}``: GeoLite2/GeoIP2 Country and City, DB-IP lite country.
Only the *location* ``country`` is used, never ``registered_country`` (the ISP's
registration, wrong for VPNs, Private Relay and multinational ranges).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from string import ascii_uppercase
from typing import Final

import maxminddb
from maxminddb.errors import InvalidDatabaseError

__all__ = [
    "EDGE_COUNTRY_HEADERS",
    "NON_COUNTRY_CODES",
    "CountryLookup",
    "country_from_edge_header",
]

logger = logging.getLogger(__name__)

# Lower-cased request headers set by CDNs/platforms to the viewer's ISO country, in
# preference order. Only trust them when the gateway sits behind that edge (otherwise
# clients can forge them); the gateway decides which apply.
EDGE_COUNTRY_HEADERS: Final[tuple[str, ...]] = (
    "cf-ipcountry",  # Cloudflare (XX = unknown, T1 = Tor)
    "cloudfront-viewer-country",  # AWS CloudFront
    "x-vercel-ip-country",  # Vercel
    "x-appengine-country",  # Google App Engine (ZZ = unknown)
)

# Two-letter values that are not countries: ISO 3166 user-assigned ranges (AA, QM-QZ,
# XA-XZ, ZZ - used as "unknown" by Cloudflare/App Engine) except XK (Kosovo, used by
# MaxMind and Cloudflare), plus MaxMind's legacy continent codes EU and AP.
NON_COUNTRY_CODES: Final[frozenset[str]] = frozenset(
    {"AA", "ZZ", "EU", "AP"}
    | {"Q" + c for c in ascii_uppercase[ascii_uppercase.index("M") :]}
    | {"X" + c for c in ascii_uppercase if c != "K"}
)

_IPV4_MAPPED_PREFIX: Final = "::ffff:"


def country_from_edge_header(value: str | None) -> str:
    """Validate a trusted edge country header value.

    Returns the upper-cased ISO 3166-1 alpha-2 code for two ASCII letters (surrounding
    whitespace ignored), and "" for missing values, placeholders (``NON_COUNTRY_CODES``,
    e.g. Cloudflare's "XX") and anything else such as Cloudflare's "T1" (Tor).
    """
    return _country_code(value.strip()) if value else ""


def _country_code(value: str) -> str:
    """Upper-cased ``value`` if it is a real two-letter country code, else ""."""
    code = value.upper()
    if len(code) != 2 or not (code.isascii() and code.isalpha()) or code in NON_COUNTRY_CODES:
        return ""
    return code


class CountryLookup:
    """IP -> country lookups in a memory-mapped MaxMind DB (C extension when installed).

    With no path, a missing file or an unreadable database, ``available`` is False and
    every lookup returns "" so the pipeline keeps running without geo enrichment.
    """

    available: bool
    description: str

    def __init__(self, mmdb_path: str | Path | None, cache_size: int = 10_000) -> None:
        """Open ``mmdb_path``; ``cache_size`` bounds memoised distinct IPs (0 disables)."""
        self._reader: maxminddb.Reader | None = None
        # Memoise: decoding a record builds nested dicts, and an IP sends bursts of events.
        self._country_cached = lru_cache(maxsize=cache_size)(self._lookup)
        if mmdb_path is None:
            self.available, self.description = False, "no geo database configured"
            return
        path = Path(mmdb_path)
        try:
            # MODE_AUTO picks MODE_MMAP_EXT (libmaxminddb C extension) when it is built.
            self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        except FileNotFoundError:
            self.available, self.description = False, f"geo database not found: {path}"
            logger.warning("geo enrichment disabled: %s", self.description)
            return
        except (OSError, InvalidDatabaseError, ValueError) as exc:
            self.available, self.description = False, f"geo database unreadable: {path} ({exc})"
            logger.warning("geo enrichment disabled: %s", self.description)
            return
        meta = self._reader.metadata()
        built = datetime.fromtimestamp(meta.build_epoch, UTC).date().isoformat()
        self.available, self.description = True, f"{meta.database_type} {built} ({path})"

    def country(self, ip: str | None) -> str:
        """Return the ISO 3166-1 alpha-2 country of ``ip`` or "" (no hit, bad IP, no DB)."""
        if not ip or self._reader is None:
            return ""
        return self._country_cached(ip)

    def close(self) -> None:
        """Release the database; later lookups return "" and ``available`` turns False."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._country_cached.cache_clear()
        self.available = False

    def _lookup(self, ip: str) -> str:
        reader = self._reader
        if reader is None:
            return ""
        ip = ip.strip()
        # Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d; look up the IPv4 part.
        if ip[:7].lower() == _IPV4_MAPPED_PREFIX and "." in ip:
            ip = ip[7:]
        try:
            record = reader.get(ip)
        except (ValueError, TypeError):  # not an IP, IPv6 in an IPv4-only DB, closed DB
            return ""
        if not isinstance(record, dict):
            return ""
        country = record.get("country")
        if not isinstance(country, dict):
            return ""
        code = country.get("iso_code")
        return _country_code(code) if isinstance(code, str) else ""
