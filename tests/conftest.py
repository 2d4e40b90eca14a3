"""Fixtures shared by every test: a real redis-server, a clean database, a ledger."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from agents.stub_server import ScriptedModelServer
from budgets import Ledger
from orchestrator.redis_server import LocalCluster, RedisServer
from tests.endpoint_files import write_toml
from tests.faults import RedisProxy


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole test session, on a free port."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """One Redis Cluster of 3 masters for the whole session, on free ports."""
    with LocalCluster(masters=3) as cluster:
        yield cluster


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_redis`` run twice: on a standalone server and on the cluster."""
    if "redis_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_redis"
    ):
        metafunc.parametrize("redis_kind", ["standalone", "cluster"], indirect=True)


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    """Which Redis the test runs on (``standalone`` unless the test is marked ``both_redis``)."""
    return str(getattr(request, "param", "standalone"))


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_kind: str) -> str:
    """The URL of the test's Redis, flushed before each test so no test sees another's keys."""
    if redis_kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        for node in cluster.masters():
            client = redis.Redis(port=node.port)
            client.flushall()
            client.close()
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
async def ledger(redis_url: str) -> AsyncIterator[Ledger]:
    """A ledger on the flushed server."""
    led = Ledger.from_url(redis_url)
    yield led
    await led.aclose()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedModelServer]:
    """One scripted OpenAI-compatible server per test module."""
    with ScriptedModelServer() as srv:
        yield srv


@pytest.fixture
def server(shared_server: ScriptedModelServer) -> ScriptedModelServer:
    """The module's server with an empty script, no records and no responder."""
    shared_server.clear()
    shared_server.responder = None
    return shared_server


@pytest.fixture
def stub() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as srv:
        yield srv


@pytest.fixture
def env(redis_url: str, stub: ScriptedModelServer, tmp_path: Path) -> dict[str, str]:
    """The environment of a worker or CLI process talking to the stub and the test Redis."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMASTER_", "REDIS_"))}
    return {
        **keep,
        "REDIS_URL": redis_url,
        "PAYMASTER_CONFIG": str(write_toml(tmp_path / "endpoints.toml", stub.base_url)),
        "PAYMASTER_HOME": str(tmp_path),
        "PAYMASTER_VISIBILITY_TIMEOUT_S": "1",
        "PAYMASTER_HEARTBEAT_S": "0.2",
        "PAYMASTER_LEASE_S": "2",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def redis_proxy(redis_server: RedisServer) -> Iterator[RedisProxy]:
    """A TCP proxy in front of the session's redis-server that can cut it off (tests/faults.py).

    Give ``redis_proxy.url`` to the process under test; the test itself talks to ``redis_url``.
    """
    with RedisProxy(upstream_port=redis_server.port) as proxy:
        yield proxy
