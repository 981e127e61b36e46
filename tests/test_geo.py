"""Country enrichment: real CountryLookup over a generated mmdb, edge header validation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from processors.geo import EDGE_COUNTRY_HEADERS, CountryLookup, country_from_edge_header
from tests.mmdb_fixture import write_country_mmdb

# Documentation ranges (RFC 5737 / RFC 3849) plus one real-looking block per family.
NETWORKS = {
    "81.2.69.0/24": "GB",
    "192.0.2.0/24": "DE",
    "198.51.100.128/25": "us",  # lower-case in the DB: normalised on read
    "2001:db8::/32": "JP",
    "2a02:8100::/27": "DE",
    "203.0.113.0/24": "XX",  # placeholder code: never returned as a country
}


@pytest.fixture(scope="module")
def mmdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_country_mmdb(tmp_path_factory.mktemp("geo") / "country.mmdb", NETWORKS)


@pytest.fixture
def lookup(mmdb_path: Path) -> Iterator[CountryLookup]:
    countries = CountryLookup(mmdb_path)
    yield countries
    countries.close()


def test_database_is_available_and_described(lookup: CountryLookup, mmdb_path: Path) -> None:
    assert lookup.available
    assert lookup.description.startswith("GeoLite2-Country 20")
    assert lookup.description.endswith(f"({mmdb_path})")


def test_reader_uses_the_c_extension(lookup: CountryLookup) -> None:
    # MODE_AUTO must have resolved to MODE_MMAP_EXT (libmaxminddb), not pure Python
    assert type(lookup._reader).__module__ == "maxminddb.extension"


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        pytest.param("81.2.69.142", "GB", id="ipv4-hit"),
        pytest.param("192.0.2.1", "DE", id="ipv4-hit-2"),
        pytest.param("198.51.100.200", "US", id="ipv4-lowercase-record"),
        pytest.param("198.51.100.1", "", id="ipv4-outside-subnet"),
        pytest.param("8.8.8.8", "", id="ipv4-miss"),
        pytest.param("2001:db8::1", "JP", id="ipv6-hit"),
        pytest.param("2001:DB8:0:0:0:0:0:ff", "JP", id="ipv6-uppercase"),
        pytest.param("2a02:810d:1234::1", "DE", id="ipv6-hit-2"),
        pytest.param("2606:4700::1111", "", id="ipv6-miss"),
        pytest.param("::ffff:81.2.69.1", "GB", id="ipv4-mapped-ipv6"),
        pytest.param(" 81.2.69.1 ", "GB", id="surrounding-whitespace"),
        pytest.param("203.0.113.9", "", id="placeholder-record"),
        pytest.param(None, "", id="none"),
        pytest.param("", "", id="empty"),
        pytest.param("not-an-ip", "", id="junk"),
        pytest.param("256.1.1.1", "", id="bad-octet"),
        pytest.param("81.2.69.1:443", "", id="with-port"),
        pytest.param("2001:db8::1::2", "", id="bad-ipv6"),
        pytest.param("\x00\ud800", "", id="binary"),
    ],
)
def test_country(lookup: CountryLookup, ip: str | None, expected: str) -> None:
    assert lookup.country(ip) == expected


def test_ipv6_in_ipv4_only_database_returns_empty(tmp_path: Path) -> None:
    writer = MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    writer.to_db_file(str(tmp_path / "v4.mmdb"))
    v4_only = CountryLookup(tmp_path / "v4.mmdb")
    assert v4_only.country("81.2.69.1") == "GB"
    assert v4_only.country("2001:db8::1") == ""
    v4_only.close()


@pytest.mark.parametrize(
    ("path_name", "description"),
    [
        pytest.param(None, "no geo database configured", id="none"),
        pytest.param("missing.mmdb", "geo database not found", id="missing-file"),
        pytest.param("corrupt.mmdb", "geo database unreadable", id="corrupt-file"),
    ],
)
def test_no_database(tmp_path: Path, path_name: str | None, description: str) -> None:
    (tmp_path / "corrupt.mmdb").write_bytes(b"not a maxmind db" * 64)
    countries = CountryLookup(None if path_name is None else tmp_path / path_name)
    assert not countries.available
    assert countries.description.startswith(description)
    assert countries.country("81.2.69.142") == ""
    assert countries.country("2001:db8::1") == ""
    countries.close()


def test_close_disables_lookups(mmdb_path: Path) -> None:
    countries = CountryLookup(str(mmdb_path))
    assert countries.country("81.2.69.142") == "GB"
    countries.close()
    assert not countries.available
    assert countries.country("81.2.69.142") == ""
    countries.close()  # idempotent


def test_cache_is_bounded(mmdb_path: Path) -> None:
    countries = CountryLookup(mmdb_path, cache_size=4)
    assert [countries.country(f"81.2.69.{i}") for i in range(50)] == ["GB"] * 50
    assert countries._country_cached.cache_info().currsize == 4
    countries.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("DE", "DE", id="upper"),
        pytest.param("de", "DE", id="lower"),
        pytest.param(" gb ", "GB", id="whitespace"),
        pytest.param("XK", "XK", id="kosovo-user-assigned-but-used"),
        pytest.param("XX", "", id="cloudflare-unknown"),
        pytest.param("T1", "", id="cloudflare-tor"),
        pytest.param("ZZ", "", id="appengine-unknown"),
        pytest.param("QZ", "", id="user-assigned"),
        pytest.param("EU", "", id="legacy-continent"),
        pytest.param("A1", "", id="legacy-anonymous-proxy"),
        pytest.param("DEU", "", id="alpha-3"),
        pytest.param("D", "", id="one-letter"),
        pytest.param("ÄÖ", "", id="non-ascii"),
        pytest.param("", "", id="empty"),
        pytest.param(None, "", id="none"),
    ],
)
def test_country_from_edge_header(value: str | None, expected: str) -> None:
    assert country_from_edge_header(value) == expected


def test_edge_headers_are_lowercase_names() -> None:
    assert "cf-ipcountry" in EDGE_COUNTRY_HEADERS
    assert all(name == name.lower().strip() for name in EDGE_COUNTRY_HEADERS)
    assert len(set(EDGE_COUNTRY_HEADERS)) == len(EDGE_COUNTRY_HEADERS)
