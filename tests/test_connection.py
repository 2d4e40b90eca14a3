"""Paymaster's Redis clients wait for a free connection instead of failing a command,
and on a cluster send each script call straight to its slot's master."""

from __future__ import annotations

import asyncio

import redis

from budgets import Amount, Budget, Ledger
from budgets.connection import MAX_CONNECTIONS, redis_client
from orchestrator.redis_server import LocalCluster


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


def _command_stats(cluster: LocalCluster) -> list[dict[str, dict[str, int]]]:
    stats = []
    for node in cluster.masters():
        client = redis.Redis(port=node.port)
        stats.append(client.info("commandstats"))
        client.close()
    return stats


async def test_a_script_call_on_a_cluster_asks_no_node_for_its_keys(
    redis_cluster: LocalCluster,
) -> None:
    for node in redis_cluster.masters():
        client = redis.Redis(port=node.port)
        client.flushall()
        client.config_resetstat()
        client.close()
    ledger = Ledger.from_url(redis_cluster.url)
    try:
        tasks = [f"route-{i}" for i in range(6)]
        for task in tasks:
            await ledger.open_task(task, Budget(tokens=10_000, usd="1"))

        async def pay(task: str) -> None:
            hold = await ledger.reserve(task, "root", tokens=10, nanos=10)
            await ledger.commit(task, hold.id, used=Amount(tokens=5, nanos=5))

        await asyncio.gather(*(pay(task) for task in tasks for _ in range(10)))
    finally:
        await ledger.aclose()
    stats = _command_stats(redis_cluster)
    # redis-py sends COMMAND GETKEYS to one node before every FCALL; the task script
    # goes by EVALSHA on a cluster, whose keys redis-py reads from its arguments.
    assert all("cmdstat_command|getkeys" not in node for node in stats), stats
    scripts = [node.get("cmdstat_evalsha", {}).get("calls", 0) for node in stats]
    assert sum(scripts) >= len(tasks) * 2
    assert sum(bool(n) for n in scripts) >= 2  # the tasks' slots are on several masters
