"""A stage's operations port (MILLIMETRIC_*_METRICS_PORT): Prometheus text on /metrics (and any
other path, as prometheus-client serves it), liveness on /health, readiness on /ready: 503 while
the stage starts or drains, or its consumer lag passes MILLIMETRIC_READY_MAX_LAG_S. Never the
gateway's public port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from ingest.metrics import STAGE_SERIES, is_ready, set_serving

StartResponse = Callable[..., Any]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """One line per scrape would drown the stage's own logs."""


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> Iterable[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [orjson.dumps(body)]


def ops_app(stage: str) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI app of one stage's operations port."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return _json(start_response, "200 OK", {"ok": True, "stage": stage})
        if path == "/ready":
            ready = is_ready(stage)
            status = "200 OK" if ready else "503 Service Unavailable"
            return _json(start_response, status, {"ok": ready, "stage": stage})
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


def serve(stage: str, port: int | None, host: str) -> None:
    """Serve the stage's operations port on a daemon thread; `port` None: none. The stage's
    series exist from now on, at 0, and it is not ready until it says so (`set_serving`)."""
    set_serving(stage, False)
    for metric, labels in STAGE_SERIES[stage]:
        metric.labels(*labels)
    if port is None:
        return
    try:
        server = make_server(host, port, ops_app(stage), ThreadingWSGIServer, handler_class=_Quiet)
    except OSError as error:
        raise SystemExit(
            f"millimetric {stage}: cannot serve metrics on {host}:{port} ({error.strerror}); "
            f"set MILLIMETRIC_{stage.upper()}_METRICS_PORT"
        ) from None
    threading.Thread(target=server.serve_forever, name=f"ops-{stage}", daemon=True).start()
