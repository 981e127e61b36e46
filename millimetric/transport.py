"""One keep-alive HTTP connection to the gateway, over the standard library's http.client.

Bodies of at least `GZIP_MIN_BYTES` are sent gzipped when that makes them smaller. A gateway that
does not decode gzip (an older one answers 400 `invalid_json` or 415) makes the transport send
plain bodies from then on; the request is repeated at once, uncompressed.
"""

from __future__ import annotations

import gzip
import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

GZIP_MIN_BYTES = 1024  # below this, the gzip header and CPU cost more than they save
GZIP_REFUSED = {(400, "invalid_json"), (415, "unsupported_encoding"), (415, "")}
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, timed out, cut short
USER_AGENT = "millimetric-python/0.1"


@dataclass(frozen=True, slots=True)
class Answer:
    """The gateway's answer: status, `Retry-After` in seconds if sent, and the JSON body."""

    status: int
    retry_after: float | None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str:
        """The error code of a refusal (`invalid_payload`, ...), or "" if the body has none."""
        return str(self.body.get("error") or "")


def _retry_after(value: str | None) -> float | None:
    try:  # the gateway sends whole seconds; an HTTP-date from a proxy falls back to backoff
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class Transport:
    """POSTs to `host`/v1/<route> with the key (and `headers`, e.g. the historical lane's);
    not thread-safe (the sender thread owns it)."""

    def __init__(
        self, host: str, key: str, timeout_s: float, headers: dict[str, str] | None = None
    ) -> None:
        url = urlsplit(host if "://" in host else f"http://{host}")
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"host must be http(s)://host[:port], not {host!r}")
        self._https = url.scheme == "https"
        self._netloc = url.netloc
        self._prefix = url.path.rstrip("/")
        self._timeout_s = timeout_s
        self._headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        } | (headers or {})
        self._conn: http.client.HTTPConnection | None = None
        self.gzip = True

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._netloc, timeout=self._timeout_s)
        return self._conn

    def close(self) -> None:
        """Drop the connection (the next post opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, route: str, body: bytes) -> Answer:
        """POST one body; raises one of NETWORK_ERRORS when no answer came."""
        if self.gzip and len(body) >= GZIP_MIN_BYTES:
            packed = gzip.compress(body, compresslevel=1, mtime=0)  # same bytes on retry
            if len(packed) < len(body):
                answer = self._post(route, packed, {"Content-Encoding": "gzip"})
                if (answer.status, answer.error) not in GZIP_REFUSED:
                    return answer
                self.gzip = False
        return self._post(route, body, {})

    def _post(self, route: str, body: bytes, extra: dict[str, str]) -> Answer:
        conn = self._connection()
        try:
            conn.request("POST", f"{self._prefix}/v1/{route}", body, self._headers | extra)
            response = conn.getresponse()
            data = response.read()
        except NETWORK_ERRORS:
            self.close()  # a half-used connection cannot be trusted with the next request
            raise
        if response.will_close:
            self.close()
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:  # a proxy's HTML error page
            parsed = {}
        return Answer(
            response.status,
            _retry_after(response.getheader("Retry-After")),
            parsed if isinstance(parsed, dict) else {},
        )
