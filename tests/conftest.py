"""Fixtures shared by every test: a real redis-server, a clean database, a ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from agents.stub_server import ScriptedModelServer
from budgets import Ledger
from orchestrator.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole test session, on a free port."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL, flushed before each test so no test sees another's keys."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


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
