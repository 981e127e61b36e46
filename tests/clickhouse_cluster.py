"""A real replicated ClickHouse cluster for tests: Debian's ZooKeeper and several 18.16 servers,
each with its own config, data dir and free loopback ports, all in one temp dir."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.services import CLICKHOUSE_SERVER_BIN, ClickHouseServer, LocalServer
from millimetric_app.embedded import free_port

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
CLUSTER = "millimetric"

MEMBER_CONFIG = """
  <zookeeper><node><host>127.0.0.1</host><port>{zookeeper}</port></node></zookeeper>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
  <remote_servers><{cluster}>{shards}</{cluster}></remote_servers>
  <macros><shard>{shard}</shard><replica>{replica}</replica></macros>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <interserver_http_port>{interserver}</interserver_http_port>
"""


class ZooKeeper(LocalServer):
    """A standalone ZooKeeper server (Debian's `zookeeper` package) on a free port."""

    def argv(self) -> list[str]:
        """ZooKeeper's standalone main, its data in this server's directory."""
        return [
            "java",
            *("-cp", f"{ZOOKEEPER_JAR}:/etc/zookeeper/conf"),
            *("-Dzookeeper.admin.enableServer=false", "-Xmx256m"),
            *("org.apache.zookeeper.server.ZooKeeperServerMain", str(self.tcp), str(self.root)),
        ]

    def start(self) -> ZooKeeper:
        """Start it and wait until it serves: its port opens first, and a clickhouse-server
        18.16 whose first handshake fails there never connects again."""
        super().start()
        deadline = time.monotonic() + 60
        while not self.serving():
            if time.monotonic() > deadline:
                raise TimeoutError(f"ZooKeeper on port {self.tcp} does not serve")
            time.sleep(0.1)
        return self

    def serving(self) -> bool:
        """Whether it answers the `srvr` command with its mode (it then takes sessions)."""
        try:
            with socket.create_connection(("127.0.0.1", self.tcp), timeout=2) as conn:
                conn.sendall(b"srvr")
                return b"Mode:" in conn.recv(4096)
        except OSError:
            return False


class ClickHouseCluster:
    """`shards` x `replicas` clickhouse-server processes forming the cluster CLUSTER."""

    def __init__(self, root: Path, zookeeper: int, shards: int = 1, replicas: int = 2) -> None:
        ports = [[free_port() for _ in range(replicas)] for _ in range(shards)]
        topology = "".join(
            "<shard><internal_replication>true</internal_replication>"
            + "".join(
                f"<replica><host>127.0.0.1</host><port>{port}</port></replica>" for port in shard
            )
            + "</shard>"
            for shard in ports
        )
        self.replicas = [
            ClickHouseServer(
                root / f"s{s}r{r}",
                port,
                MEMBER_CONFIG.format(
                    zookeeper=zookeeper,
                    cluster=CLUSTER,
                    shards=topology,
                    shard=f"{s:02d}",
                    replica=f"s{s}r{r}",
                    interserver=free_port(),
                ),
            )
            for s, shard in enumerate(ports)
            for r, port in enumerate(shard)
        ]

    def start(self) -> ClickHouseCluster:
        """Start every server."""
        for server in self.replicas:
            server.start()
        return self

    def stop(self) -> None:
        """Stop every server still running."""
        for server in self.replicas:
            server.stop()


@contextmanager
def clickhouse_cluster(shards: int = 1, replicas: int = 2) -> Iterator[ClickHouseCluster]:
    """ZooKeeper and a started cluster, stopped and removed afterwards (skips without them)."""
    if not ZOOKEEPER_JAR.exists() or not CLICKHOUSE_SERVER_BIN.exists():
        pytest.skip("needs Debian's zookeeper and clickhouse-server (tests/run.sh installs them)")
    root = Path(tempfile.mkdtemp(prefix="mm-ch-cluster-"))
    zookeeper = ZooKeeper(root / "zookeeper").start()
    cluster = ClickHouseCluster(root, zookeeper.tcp, shards, replicas)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        zookeeper.stop()
        shutil.rmtree(root, ignore_errors=True)
