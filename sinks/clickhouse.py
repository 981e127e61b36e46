"""ClickHouse connections: a server through clickhouse-driver, or the embedded chdb engine.

Both expose the same small surface (execute, query as TSV, columnar insert) plus `features`, what
the server version supports, so the schema and writer degrade by version explicitly.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from pydantic import SecretStr

from ingest.settings import Settings

# Feature -> first server version that has it. The Debian 18.16 server lacks all of these.
FEATURE_VERSIONS: dict[str, tuple[int, int]] = {
    "datetime64": (20, 1),
    "low_cardinality": (19, 9),  # earlier: behind allow_experimental_low_cardinality_type
    "codecs": (19, 10),
    "ttl": (19, 6),
    "lightweight_delete": (22, 8),
    "insert_deduplication_token": (22, 2),
}


# Server error codes that mean "this data is wrong": retrying cannot help, the rows go to the
# dead-letter topic. Everything else (connection loss, timeouts, too many parts, memory) is
# retried with backoff.
CONTENT_ERROR_CODES: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    53: "TYPE_MISMATCH",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    386: "NO_COMMON_TYPE",
    800: "PY_EXCEPTION_OCCURED",  # chdb: a Python value its column cannot hold
}
# Client-side failures to encode a value are content errors too.
CONTENT_EXCEPTIONS = (TypeError, ValueError, OverflowError, struct.error)


def is_content_error(error: BaseException) -> bool:
    """Whether ClickHouse (or the driver) refused the data itself, not the moment."""
    code = getattr(error, "code", None)
    if code is None and (match := re.search(r"Code: (\d+)", str(error))):
        code = int(match[1])  # chdb reports server codes in the message text
    if code is not None:
        return code in CONTENT_ERROR_CODES
    return isinstance(error, CONTENT_EXCEPTIONS)


@dataclass(frozen=True, slots=True)
class Features:
    """What the connected server supports, from its version."""

    version: tuple[int, int]

    def has(self, feature: str) -> bool:
        """Whether the server version has `feature` (a key of FEATURE_VERSIONS)."""
        return self.version >= FEATURE_VERSIONS[feature]


class ClickHouse(Protocol):
    """What the sink, the migrations and `millimetric sql` need of a ClickHouse."""

    features: Features
    description: str

    def execute(self, sql: str) -> None: ...
    def query_tsv(self, sql: str) -> str: ...
    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[list[Any]], select: Sequence[str]
    ) -> None: ...
    def close(self) -> None: ...


def _version(text: str) -> tuple[int, int]:
    major, minor = text.strip().split(".")[:2]
    return int(major), int(minor)


class ServerClickHouse:
    """A ClickHouse server over the native protocol (clickhouse-driver)."""

    def __init__(
        self,
        url: str,
        *,
        password: SecretStr | None = None,
        secure: bool = False,
        ca_certs: Path | None = None,
    ) -> None:
        """Connect to `url` (`clickhouse://user@host:port/db`); `password` overrides the URL's,
        `secure` speaks TLS (verifying the server against `ca_certs`, else the system's CAs)."""
        from clickhouse_driver import Client

        parsed = urlparse(url)
        self.database = parsed.path.lstrip("/") or "default"
        default_port = 9440 if secure else 9000
        self.description = (
            f"clickhouse://{parsed.hostname}:{parsed.port or default_port}/{self.database}"
            + (" (TLS)" if secure else "")
        )
        self.client_options: dict[str, Any] = dict(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or default_port,
            user=unquote(parsed.username or "default"),
            password=(password.get_secret_value() if password else unquote(parsed.password or "")),
            secure=secure,
            verify=True,
            ca_certs=str(ca_certs) if ca_certs else None,
            connect_timeout=5,
        )
        bootstrap = Client(**self.client_options)
        bootstrap.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        bootstrap.disconnect()
        self._client = Client(
            **self.client_options, database=self.database, send_receive_timeout=60
        )
        self._lock = threading.Lock()  # the driver's client is not thread-safe
        self.features = Features(_version(self._client.execute("SELECT version()")[0][0]))

    def execute(self, sql: str) -> None:
        """Run a statement."""
        with self._lock:
            self._client.execute(sql)

    def query_tsv(self, sql: str) -> str:
        """Run a query and return its rows tab-separated, one per line."""
        with self._lock:
            rows = self._client.execute(sql)
        return "".join("\t".join(_tsv(v) for v in row) + "\n" for row in rows)

    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[list[Any]], select: Sequence[str]
    ) -> None:
        """One columnar insert over the native protocol (`select` is for chdb only)."""
        with self._lock:
            self._client.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES",
                list(data),
                columnar=True,
                types_check=False,
            )

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()


def _tsv(value: Any) -> str:
    if isinstance(value, datetime):  # as ClickHouse prints it: no offset, server time zone
        value = value.replace(tzinfo=None).isoformat(sep=" ")
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


class EmbeddedClickHouse:
    """The chdb engine in this process, with its data in a directory (one process at a time)."""

    def __init__(self, path: Path) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self.description = f"embedded chdb at {path}"
        self._session = session.Session(str(path))
        self._lock = threading.Lock()  # one statement at a time per session
        self.features = Features(_version(self.query_tsv("SELECT version()")))

    def execute(self, sql: str) -> None:
        """Run a statement."""
        with self._lock:
            self._session.query(sql)

    def query_tsv(self, sql: str) -> str:
        """Run a query and return its rows tab-separated, one per line."""
        with self._lock:
            return str(self._session.query(sql, "TabSeparated"))

    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[list[Any]], select: Sequence[str]
    ) -> None:
        """One columnar insert: chdb reads the Python lists in place through Python()."""
        frame = dict(zip(columns, data, strict=True))  # noqa: F841 - read by name by Python(frame)
        with self._lock:
            self._session.query(
                f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(select)} "
                "FROM Python(frame)"
            )

    def close(self) -> None:
        """Release the data directory."""
        self._session.close()


def open_configured(settings: Settings) -> ClickHouse:
    """The configured ClickHouse: a server (with the settings' password and TLS) when
    `clickhouse_url` is set, else chdb in `<data_dir>/clickhouse`."""
    if settings.clickhouse_url:
        return ServerClickHouse(
            settings.clickhouse_url,
            password=settings.clickhouse_password,
            secure=settings.clickhouse_secure,
            ca_certs=settings.clickhouse_ca_certs,
        )
    return EmbeddedClickHouse(settings.data_dir / "clickhouse")
