"""The embedded default: a private Redis (and the bundled local model) started on demand.

With no ``REDIS_URL``, Paymaster runs the ``redis-server`` found on PATH as a
daemon on loopback, with its data (AOF on) in ``$PAYMASTER_HOME/redis``, and
reuses it on every later run. We use the system binary rather than a Redis
shipped in a pip package: Debian's package is maintained, and the ledger's
tests run against the same server.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from orchestrator.errors import MissingRedis
from orchestrator.redis_server import free_port

_STATE = "redis.json"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(home: Path, *, startup_timeout_s: float = 10.0) -> str:
    """The URL of the private Redis under ``home``, starting it if it is not running."""
    state = home / _STATE
    if state.exists():
        try:
            port = int(json.loads(state.read_text())["port"])
        except (ValueError, KeyError, OSError):
            port = 0
        if port and _answers(port):
            return f"redis://127.0.0.1:{port}/0"
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingRedis()
    data = home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    subprocess.run(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "yes",
            "--pidfile",
            str(data / "redis.pid"),
            "--logfile",
            str(data / "redis.log"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if _answers(port):
            state.write_text(json.dumps({"port": port}))
            return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise MissingRedis()
