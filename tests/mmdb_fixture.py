"""Build small MaxMind-format Country databases for tests (GeoLite2-Country layout)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet

__all__ = ["write_country_mmdb"]


def write_country_mmdb(path: Path, networks: Mapping[str, str]) -> Path:
    """Write a GeoLite2-Country-shaped database mapping CIDR -> ISO code; return ``path``.

    ``networks`` may mix IPv4 and IPv6 CIDRs (e.g. ``{"81.2.69.0/24": "GB",
    "2001:db8::/32": "DE"}``); the database is IPv6 with IPv4 in the ``::/96`` subtree,
    like MaxMind's own files. Records carry ``country`` and ``registered_country`` maps
    with ``iso_code`` and an English ``names`` entry.
    """
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,  # store IPv4 under ::/96 where readers look IPv4 up
        database_type="GeoLite2-Country",
        languages=["en"],
        description={"en": "Millimetric test GeoLite2-Country"},
    )
    for cidr, iso_code in networks.items():
        country = {"iso_code": iso_code, "names": {"en": iso_code}}
        writer.insert_network(IPSet([cidr]), {"country": country, "registered_country": country})
    writer.to_db_file(str(path))
    return path
