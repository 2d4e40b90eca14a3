"""The one way Paymaster opens a Redis client: a pool that waits for a free connection.

redis-py's default pool refuses a command outright (``MaxConnectionsError``)
once 100 connections are checked out, which a worker running several tasks,
each with several subtasks closing, saving and counting at once, reaches
easily. A blocking pool makes such a command wait for a connection instead,
up to ``POOL_TIMEOUT_S``.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

#: Connections one client opens at most; further commands wait for one to be free.
MAX_CONNECTIONS = 64
#: How long a command waits for a free connection before it fails.
POOL_TIMEOUT_S = 20.0


def redis_client(url: str, **options: Any) -> Redis:
    """A client of the Redis at ``url`` (replies decoded to ``str``); ``options`` go to
    each connection (timeouts, retry policy)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT_S,
        decode_responses=True,
        **options,
    )
    return Redis.from_pool(pool)  # the client owns the pool: closing one closes both
