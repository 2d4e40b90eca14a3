"""The embedded default: a private Redis (and the bundled local model) started on demand.

With no ``REDIS_URL``, Paymaster runs the ``redis-server`` found on PATH as a
daemon on loopback, with its data (AOF on) in ``$PAYMASTER_HOME/redis``, and
reuses it on every later run. We use the system binary rather than a Redis
shipped in a pip package: Debian's package is maintained, and the ledger's
tests run against the same server.

Its port and pid are recorded in ``$PAYMASTER_HOME/redis.json``; a recorded
server is reused, or stopped, only while that pid is still our redis-server
on that port.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from agents.processes import Identity, Recorded, is_ours, option
from agents.processes import stop as stop_process
from orchestrator.errors import MissingRedis
from orchestrator.redis_server import free_port

STATE_FILE = "redis.json"
DATA_DIR = "redis"
PID_FILE = "redis.pid"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_url(port: int) -> str:
    """The URL of the private Redis on ``port``."""
    return f"redis://127.0.0.1:{port}/0"


def _pidfile_pid(home: Path) -> int | None:
    try:
        return int((home / DATA_DIR / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def recorded_redis(home: Path) -> Recorded | None:
    """The private Redis recorded under ``home``, running or not; None if none is.

    Records written before the pid was kept in ``redis.json`` take it from
    Redis's own pidfile.
    """
    try:
        state = json.loads((home / STATE_FILE).read_text())
        port, pid = state["port"], state.get("pid", _pidfile_pid(home))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if isinstance(port, int) and isinstance(pid, int):
        return Recorded(pid=pid, port=port)
    return None


def _redis_on(port: int) -> Identity:
    def identity(words: Sequence[str]) -> bool:
        # A daemonized redis-server retitles itself "redis-server 127.0.0.1:<port>".
        binary = bool(words) and Path(words[0]).name == "redis-server"
        listens = option(words, "--port") == str(port) or f"127.0.0.1:{port}" in words
        return binary and listens

    return identity


def is_our_redis(pid: int, *, port: int) -> bool:
    """True if ``pid`` is a redis-server on ``port`` (not a process that reused the pid)."""
    return is_ours(pid, identity=_redis_on(port))


def stop_redis(home: Path, *, grace_s: float = 10.0) -> bool:
    """Stop the private Redis recorded under ``home`` and forget it; False if none of ours ran.

    Its data stays in ``home/redis``; the next run starts it again on a new port.
    A recorded pid that is no longer our redis-server is left alone.
    """
    recorded = recorded_redis(home)
    (home / STATE_FILE).unlink(missing_ok=True)
    if recorded is None:
        return False
    stopped = stop_process(recorded.pid, identity=_redis_on(recorded.port), grace_s=grace_s)
    if stopped:  # SIGKILL leaves the pidfile behind
        (home / DATA_DIR / PID_FILE).unlink(missing_ok=True)
    return stopped


def ensure_redis(home: Path, *, startup_timeout_s: float = 10.0) -> str:
    """The URL of the private Redis under ``home``, starting it if it is not running."""
    state = home / STATE_FILE
    recorded = recorded_redis(home)
    if recorded and is_our_redis(recorded.pid, port=recorded.port) and _answers(recorded.port):
        return redis_url(recorded.port)
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingRedis()
    data = home / DATA_DIR
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
            str(data / PID_FILE),
            "--logfile",
            str(data / "redis.log"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        pid = _pidfile_pid(home)
        # The pidfile may still name an earlier server until the new one writes it.
        if pid is not None and is_our_redis(pid, port=port) and _answers(port):
            state.write_text(json.dumps({"port": port, "pid": pid}))
            return redis_url(port)
        time.sleep(0.05)
    raise MissingRedis()
