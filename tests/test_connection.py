"""Paymaster's Redis clients wait for a free connection instead of failing a command."""

from __future__ import annotations

import asyncio

from budgets.connection import MAX_CONNECTIONS, redis_client


async def test_a_burst_beyond_the_pool_waits_for_connections_and_never_fails(
    redis_url: str,
) -> None:
    client = redis_client(redis_url)
    watcher = redis_client(redis_url)
    try:
        await client.set("pm:test:burst", "x")
        # Each BLPOP holds its connection for 50 ms: 4x the pool at once must queue.
        n = 4 * MAX_CONNECTIONS
        replies = await asyncio.gather(
            *(client.blpop([f"pm:test:empty:{i}"], timeout=0.05) for i in range(n))
        )
        assert replies == [None] * n
        clients = await watcher.client_list()
        assert len(clients) <= MAX_CONNECTIONS + 1  # the pool's, and the watcher's own
        assert await client.get("pm:test:burst") == "x"  # replies still decoded to str
    finally:
        await client.aclose()
        await watcher.aclose()
