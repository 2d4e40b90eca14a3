"""A private ``redis-server`` process: the embedded default, and the one tests use."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port a cluster node can use: at most 55535, with its bus port (+10000) free too."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """Starts ``redis-server`` on loopback; stops it on exit.

    With ``data_dir`` the data stays there (AOF when ``aof``); without, a
    temporary directory is used and removed on stop.
    """

    def __init__(
        self,
        *,
        aof: bool = False,
        data_dir: Path | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH; install it with: apt-get install -y redis-server"
            )
        self._binary = binary
        self._aof = aof
        self._keep = data_dir is not None
        self._dir = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="pm-redis-"))
        self.port = port if port is not None else free_port()
        self._extra = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        args = [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self._dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self._aof else "no",
            "--protected-mode",
            "no",
            *self._extra,
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def running(self) -> bool:
        """True while the process runs."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed); its data stays until :meth:`stop`."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        """Stop the server and remove its data."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if not self._keep:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalCluster:
    """A Redis Cluster on loopback: ``masters`` masters, each with ``replicas`` replicas.

    Every node is a :class:`RedisServer` with cluster mode on; ``redis-cli --cluster
    create`` joins them and spreads the 16,384 slots over the masters. For tests and
    benchmarks; :attr:`url` names one node, which is all a client needs.
    """

    def __init__(self, *, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError(
                "redis-cli is not on PATH; install it with: apt-get install -y redis-tools"
            )
        self._cli = cli
        self._masters = masters
        self._replicas = replicas
        self._timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The URL of the first node (any node of a cluster leads a client to the rest)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> LocalCluster:
        """Start every node, create the cluster and wait until every slot is served."""
        count = self._masters * (1 + self._replicas)
        try:
            for _ in range(count):
                node = RedisServer(
                    port=free_cluster_port(),
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(self._timeout_ms),
                        # A promoted replica must take over at once, however stale.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
                self.nodes.append(node.start())
            subprocess.run(
                [
                    self._cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    str(self._replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` (every slot served)
        and every live replica's link to its master is up (its first sync is done)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.running]
            if all(self._field(n, "cluster", "cluster_state") == "ok" for n in live) and all(
                self._field(n, "info", "master_link_status") in ("", "up") for n in live
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not become healthy in {timeout_s:.0f}s")

    def _field(self, node: RedisServer, command: str, name: str) -> str:
        """One ``name:value`` line of ``CLUSTER INFO`` or ``INFO`` (``""`` when absent)."""
        args = ["cluster", "info"] if command == "cluster" else ["info", "replication"]
        out = subprocess.run(
            [self._cli, "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
        for line in out.splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
        return ""

    def masters(self) -> list[RedisServer]:
        """The nodes that are masters right now (a failover changes which)."""
        found = []
        for node in self.nodes:
            if not node.running:
                continue
            out = subprocess.run(
                [self._cli, "-p", str(node.port), "role"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            if out.startswith("master"):
                found.append(node)
        return found

    def stop(self) -> None:
        """Stop every node and remove its data."""
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
