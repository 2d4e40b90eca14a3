"""``paymaster services``: listing and stopping the private Redis and the local model, for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import local_model
from agents.endpoints import DEFAULT_LOCAL_PORT, LOCAL_URL_ENV
from agents.processes import command_words
from agents.stub_server import ScriptedModelServer
from orchestrator import embedded
from orchestrator.api import Paymaster
from orchestrator.embedded import ensure_redis, is_our_redis
from orchestrator.redis_server import free_port
from orchestrator.services import stop_services

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (apt-get install -y redis-server)",
)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A PAYMASTER_HOME whose services, if a test leaves any running, are stopped after it."""
    yield tmp_path
    stop_services(tmp_path, grace_s=2)


def _services(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # No REDIS_URL: `services` must work (and start nothing) without one.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PAYMASTER_HOME": str(home)}
    command = [sys.executable, "-m", "orchestrator.cli", "services", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def _listed(home: Path) -> dict[str, dict[str, Any]]:
    done = _services(home, "--json")
    assert done.returncode == 0, done.stderr
    return {s["name"]: s for s in json.loads(done.stdout)}


def _gone(pid: int, *, timeout_s: float = 10.0) -> bool:
    # The daemon is not our child; once it exits init reaps it and /proc forgets it.
    deadline = time.monotonic() + timeout_s
    while command_words(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_listing_starts_nothing(home: Path) -> None:
    listed = _listed(home)
    assert set(listed) == {"redis", "local-model"}
    assert all(not s["running"] and s["pid"] is None and s["url"] is None for s in listed.values())
    assert list(home.iterdir()) == []


@needs_redis
def test_services_lists_and_stops_the_private_redis(home: Path) -> None:
    url = ensure_redis(home)
    state = json.loads((home / embedded.STATE_FILE).read_text())
    pid, port = state["pid"], state["port"]
    assert url == f"redis://127.0.0.1:{port}/0"
    assert int((home / "redis" / "redis.pid").read_text()) == pid
    assert is_our_redis(pid, port=port)

    listed = _listed(home)
    assert listed["redis"] | {"state_file": None} == {
        "name": "redis",
        "pid": pid,
        "port": port,
        "url": url,
        "running": True,
        "state_file": None,
    }
    assert listed["local-model"]["running"] is False
    table = _services(home, "list")
    assert table.returncode == 0
    assert str(pid) in table.stdout
    assert url in table.stdout

    stopped = _services(home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped redis (pid {pid}, port {port})" in stopped.stdout
    assert _gone(pid)
    assert not (home / embedded.STATE_FILE).exists()
    assert (home / "redis" / "appendonlydir").is_dir()  # the data stays
    assert _listed(home)["redis"]["running"] is False

    again = _services(home, "stop")
    assert again.returncode == 0, again.stderr
    assert "nothing was running" in again.stdout


@needs_redis
def test_a_stopped_redis_starts_again_with_its_data(home: Path) -> None:
    import redis

    client = redis.Redis.from_url(ensure_redis(home))
    client.set("kept", "yes")
    client.close()
    assert _services(home, "stop").returncode == 0
    client = redis.Redis.from_url(ensure_redis(home))
    assert client.get("kept") == b"yes"
    client.close()


def test_stop_leaves_a_recorded_pid_that_is_not_ours_alone(home: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for name in (embedded.STATE_FILE, local_model.STATE_FILE):
            (home / name).write_text(json.dumps({"pid": sleeper.pid, "port": free_port()}))
        listed = _listed(home)
        assert [s["pid"] for s in listed.values()] == [sleeper.pid, sleeper.pid]
        assert not any(s["running"] for s in listed.values())

        stopped = _services(home, "stop", "--grace", "1")
        assert stopped.returncode == 0, stopped.stderr
        assert "nothing was running" in stopped.stdout
        assert f"pid {sleeper.pid} is not ours" in stopped.stdout
        assert sleeper.poll() is None
        assert not (home / embedded.STATE_FILE).exists()
        assert not (home / local_model.STATE_FILE).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_redis
def test_a_redis_server_on_another_port_is_not_ours(home: Path) -> None:
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    other = subprocess.Popen([binary, *args], cwd=home, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not is_our_redis(other.pid, port=port):
            assert time.monotonic() < deadline, command_words(other.pid)
            time.sleep(0.02)
        # The pid is a redis-server, but not on the recorded port: left alone.
        (home / embedded.STATE_FILE).write_text(json.dumps({"pid": other.pid, "port": port + 1}))
        assert stop_services(home, grace_s=1)[0].outcome == "stale"
        assert other.poll() is None
        # A Redis answers on the recorded port, but the recorded pid is not it: not reused.
        (home / embedded.STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "port": port}))
        url = ensure_redis(home)
        assert url != f"redis://127.0.0.1:{port}/0"
        recorded = json.loads((home / embedded.STATE_FILE).read_text())
        assert recorded["pid"] != other.pid
        assert is_our_redis(recorded["pid"], port=recorded["port"])
        assert stop_services(home, grace_s=2)[0].outcome == "stopped"
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_the_local_model_url_in_the_environment_is_used_as_is(
    home: Path, redis_url: str, server: ScriptedModelServer
) -> None:
    env = {"PAYMASTER_HOME": str(home), LOCAL_URL_ENV: server.base_url}
    pm = Paymaster(redis_url=redis_url, env=env)
    try:
        assert pm.endpoints.default_endpoint.base_url == server.base_url
    finally:
        pm.close()
    assert not (home / local_model.STATE_FILE).exists()
    assert local_model.recorded_server(home) is None


def test_without_the_url_our_own_server_is_ensured(
    home: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, int | None]] = []

    def ensure_running(state_dir: Path, *, port: int | None = None, **kwargs: Any) -> str:
        calls.append((state_dir, port))
        return "http://127.0.0.1:9/v1"

    monkeypatch.setattr(local_model, "ensure_running", ensure_running)
    pm = Paymaster(redis_url=redis_url, env={"PAYMASTER_HOME": str(home), LOCAL_URL_ENV: ""})
    assert pm.endpoints.default_endpoint.base_url == "http://127.0.0.1:9/v1"
    assert calls == [(home, DEFAULT_LOCAL_PORT)]
