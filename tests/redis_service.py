"""A throwaway real ``redis-server`` for tests (no mocks).

``running_redis()`` starts Debian's ``redis-server`` on a free loopback port with a temporary
working directory and no persistence, and stops it on exit. If ``MILLIMETRIC_TEST_REDIS_URL``
is set, that external server is used instead; it cannot be stopped or restarted, so
``stop()``/``start()`` skip the calling test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

EXTERNAL_URL_ENV = "MILLIMETRIC_TEST_REDIS_URL"
_STARTUP_TIMEOUT = 10.0


def _free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server subprocess (or an external server) that tests can stop and restart."""

    def __init__(self, workdir: Path | None, *, external_url: str | None = None) -> None:
        """Describe a server; call ``start()`` to launch a managed one."""
        self._workdir = workdir
        self._external_url = external_url
        self._port = 0 if external_url else _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL clients should connect to."""
        return self._external_url or f"redis://127.0.0.1:{self._port}/0"

    @property
    def managed(self) -> bool:
        """True when this helper owns the process (so it can stop/restart it)."""
        return self._external_url is None

    def start(self) -> None:
        """Launch redis-server on the same port as before and wait until it answers PING."""
        self._require_managed()
        if self._proc is not None:
            return
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        assert self._workdir is not None
        log = (self._workdir / "redis.log").open("ab")
        args = [binary, "--port", str(self._port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self._workdir)]
        # The child inherits the log fd; our copy can be closed right away.
        with log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_for_ping()

    def stop(self) -> None:
        """Terminate the server and wait for it to exit (its data is lost, by design)."""
        self._require_managed()
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _require_managed(self) -> None:
        """Skip the calling test when the server is external and cannot be controlled."""
        if not self.managed:
            pytest.skip(f"{EXTERNAL_URL_ENV} is set: the external Redis cannot be stopped")

    def _wait_for_ping(self) -> None:
        """Poll PING until the server answers, failing loudly if it died or never came up."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    """Yield a running Redis: a fresh managed subprocess, or the external one from the env."""
    external = os.environ.get(EXTERNAL_URL_ENV)
    if external:
        yield RedisServer(None, external_url=external)
        return
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.skip("redis-server binary not installed")
    with tempfile.TemporaryDirectory(prefix="mm-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
