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
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlparse

from pydantic import SecretStr

from ingest.dev_extra import import_dev_module
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


# What a failed insert says about the rows. "content": the rows are wrong, retrying cannot
# help, the refused ones go to the dead-letter topic. "transient": the server or the moment,
# not the rows; retried until it heals (an operator may have to act), nothing is dead-lettered.
# "partitions": the block spans more months than one insert may create partitions for; split it.
# "unknown": anything else; retried a bounded number of times, then treated as the rows' fault.
Refusal = Literal["content", "transient", "partitions", "unknown"]

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
TRANSIENT_ERROR_CODES: dict[int, str] = {
    3: "UNEXPECTED_END_OF_FILE",
    32: "ATTEMPT_TO_READ_AFTER_EOF",
    60: "UNKNOWN_TABLE",
    81: "UNKNOWN_DATABASE",
    102: "UNEXPECTED_PACKET_FROM_SERVER",
    159: "TIMEOUT_EXCEEDED",
    164: "READONLY",
    192: "UNKNOWN_USER",
    193: "WRONG_PASSWORD",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    225: "NO_ZOOKEEPER",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    252: "TOO_MANY_PARTS",  # merges behind; but see TOO_MANY_PARTITIONS
    285: "TOO_FEW_LIVE_REPLICAS",
    286: "UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE",
    319: "UNKNOWN_STATUS_OF_INSERT",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
    999: "KEEPER_EXCEPTION",
}
# Code 252 is also "Too many partitions for single INSERT block" (max_partitions_per_insert_block).
TOO_MANY_PARTITIONS = re.compile(r"partitions for (a )?single insert block", re.IGNORECASE)
# Without a code: client-side failures to encode a value, and a connection that failed.
CONTENT_EXCEPTIONS = (TypeError, ValueError, OverflowError, struct.error)
TRANSIENT_EXCEPTIONS = (OSError, EOFError)


def refusal(error: BaseException) -> Refusal:
    """What a failed insert's error says about the rows (see `Refusal`)."""
    code = getattr(error, "code", None)
    if code is None and (match := re.search(r"Code: (\d+)", str(error))):
        code = int(match[1])  # chdb reports server codes in the message text
    if code is None:
        if isinstance(error, TRANSIENT_EXCEPTIONS):
            return "transient"
        return "content" if isinstance(error, CONTENT_EXCEPTIONS) else "unknown"
    if TOO_MANY_PARTITIONS.search(str(error)):
        return "partitions"
    if code in CONTENT_ERROR_CODES:
        return "content"
    return "transient" if code in TRANSIENT_ERROR_CODES else "unknown"


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
    database: str
    cluster: str | None  # the schema is on this cluster (sinks/cluster.py); None: one server

    def execute(self, sql: str) -> None: ...
    def query_tsv(self, sql: str) -> str: ...
    def query_every_replica(self, sql: str) -> list[str]: ...
    def insert_columns(
        self, table: str, columns: Sequence[str], data: Sequence[list[Any]], select: Sequence[str]
    ) -> None: ...
    def close(self) -> None: ...


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a `SELECT version()` answer."""
    major, minor = text.strip().split(".")[:2]
    return int(major), int(minor)


class ServerClickHouse:
    """A ClickHouse server over the native protocol (clickhouse-driver); with `cluster`, one
    member of that cluster, the database created on all of them."""

    def __init__(
        self,
        url: str,
        cluster: str | None = None,
        *,
        password: SecretStr | None = None,
        secure: bool = False,
        ca_certs: Path | None = None,
    ) -> None:
        """Connect to `url` (`clickhouse://user@host:port/db`); `password` overrides the URL's,
        `secure` speaks TLS (verifying the server against `ca_certs`, else the system's CAs)."""
        from clickhouse_driver import Client

        if cluster is not None and not re.fullmatch(r"\w+", cluster):
            raise ValueError(f"a cluster name is letters, digits and _ only: {cluster!r}")
        parsed = urlparse(url)
        self.database = parsed.path.lstrip("/") or "default"
        self.cluster = cluster
        default_port = 9440 if secure else 9000
        self.description = (
            f"clickhouse://{parsed.hostname}:{parsed.port or default_port}/{self.database}"
            + (" (TLS)" if secure else "")
            + (f" (cluster {cluster})" if cluster else "")
        )
        self._credentials: dict[str, Any] = dict(
            user=unquote(parsed.username or "default"),
            password=(password.get_secret_value() if password else unquote(parsed.password or "")),
            secure=secure,
            verify=True,
            ca_certs=str(ca_certs) if ca_certs else None,
            connect_timeout=5,
        )
        host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
        bootstrap = Client(host=host, port=port, **self._credentials)
        on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
        bootstrap.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}{on_cluster}")
        bootstrap.disconnect()
        self._client = self._connect(host, port)
        self._lock = threading.Lock()  # the driver's client is not thread-safe
        self.features = Features(parse_version(self._client.execute("SELECT version()")[0][0]))

    def _connect(self, host: str, port: int) -> Any:
        from clickhouse_driver import Client

        # Through a Distributed table, an insert returns once a replica of each shard has it,
        # not once it is queued on this server: only then may the sink commit its offsets.
        settings = {"insert_distributed_sync": 1} if self.cluster else {}
        return Client(
            host=host,
            port=port,
            database=self.database,
            send_receive_timeout=60,
            settings=settings,
            **self._credentials,
        )

    def query_every_replica(self, sql: str) -> list[str]:
        """Run a query on every replica of the cluster (on this server alone without one)."""
        if self.cluster is None:
            return [self.query_tsv(sql)]
        hosts = self.query_tsv(
            f"SELECT host_address, port FROM system.clusters WHERE cluster = '{self.cluster}'"
        )
        outputs = []
        for line in hosts.splitlines():
            host, port = line.split("\t")
            client = self._connect(host, int(port))
            try:
                rows = client.execute(sql)
            finally:
                client.disconnect()
            outputs.append("".join("\t".join(_tsv(v) for v in row) + "\n" for row in rows))
        return outputs

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
        session = import_dev_module("chdb.session")  # the dev extra: production has a server
        path.mkdir(parents=True, exist_ok=True)
        self.description = f"embedded chdb at {path}"
        self.database = "default"
        self.cluster: str | None = None
        self._session = session.Session(str(path))
        self._lock = threading.Lock()  # one statement at a time per session
        self.features = Features(parse_version(self.query_tsv("SELECT version()")))

    def execute(self, sql: str) -> None:
        """Run a statement."""
        with self._lock:
            self._session.query(sql)

    def query_tsv(self, sql: str) -> str:
        """Run a query and return its rows tab-separated, one per line."""
        with self._lock:
            return str(self._session.query(sql, "TabSeparated"))

    def query_every_replica(self, sql: str) -> list[str]:
        """Run a query here: the embedded engine is its only replica."""
        return [self.query_tsv(sql)]

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
    """The configured ClickHouse: a server (a member of `clickhouse_cluster`, if set; with the
    settings' password and TLS) when `clickhouse_url` is set, else chdb in the data dir."""
    if settings.clickhouse_url:
        return ServerClickHouse(
            settings.clickhouse_url,
            settings.clickhouse_cluster,
            password=settings.clickhouse_password,
            secure=settings.clickhouse_secure,
            ca_certs=settings.clickhouse_ca_certs,
        )
    if settings.clickhouse_cluster:
        raise ValueError("MILLIMETRIC_CLICKHOUSE_CLUSTER needs MILLIMETRIC_CLICKHOUSE_URL")
    return EmbeddedClickHouse(settings.data_dir / "clickhouse")
