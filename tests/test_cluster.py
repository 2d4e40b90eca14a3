"""Redis Cluster: detection from the URL, and a master killed mid-run with its replica promoted.

The ledger's and the orchestrator's own tests run on a cluster too (``both_redis``);
this module holds what only a cluster has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from budgets import Amount, Budget, Ledger
from budgets.connection import is_cluster, redis_client
from budgets.errors import LedgerError
from budgets.keys import TaskKeys
from budgets.tree import ReservationState
from orchestrator.redis_server import LocalCluster, RedisServer, free_cluster_port

TASKS = [f"fo-{i}" for i in range(6)]
LOOPS = 24
USED = Amount(tokens=7, nanos=70)


async def test_a_cluster_node_url_gets_the_cluster_client(
    redis_cluster: LocalCluster, redis_server: RedisServer
) -> None:
    assert is_cluster(redis_cluster.url)
    assert not is_cluster(redis_server.url)
    for node in redis_cluster.nodes:  # any node leads to the whole cluster
        client = redis_client(f"redis://127.0.0.1:{node.port}")
        assert isinstance(client, RedisCluster)
        await client.set("pm:probe", "1")
        assert await client.get("pm:probe") == "1"
        await client.aclose()
    standalone = redis_client(redis_server.url)
    assert isinstance(standalone, Redis)
    await standalone.aclose()


def test_a_server_that_cannot_be_asked_is_taken_as_standalone_and_asked_again() -> None:
    port = free_cluster_port()
    url = f"redis://127.0.0.1:{port}"
    assert not is_cluster(url)  # nothing listens: standalone, its first command fails
    node = RedisServer(port=port, extra_args=["--cluster-enabled", "yes"])
    with node:
        # A cluster node on that very URL now: the unanswered probe was not kept.
        assert is_cluster(url)
    assert is_cluster(url)  # an answer is kept, even once the server is gone


@pytest.fixture(scope="module")
def replicated() -> Iterator[LocalCluster]:
    """A cluster of 3 masters with a replica each, for this module's failover."""
    with LocalCluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        yield cluster


async def _until_done(step_name: str, step: object) -> object:
    """Run an idempotent ledger step until the cluster answers it (as a caller retries)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await step()  # type: ignore[operator]
        except (LedgerError, OSError, ConnectionError, TimeoutError, Exception) as e:
            if isinstance(e, AssertionError) or time.monotonic() > deadline:
                raise AssertionError(f"{step_name} never went through: {e!r}") from e
            await asyncio.sleep(0.05)


async def test_a_master_killed_mid_run_loses_and_creates_no_money(
    replicated: LocalCluster,
) -> None:
    ledger = Ledger.from_url(replicated.url)
    budget = Budget(tokens=10**9, usd="1000")
    for task in TASKS:
        await ledger.open_task(task, budget)
    committed: dict[str, list[str]] = {t: [] for t in TASKS}
    failures: list[str] = []
    stop = asyncio.Event()

    async def loop(n: int) -> None:
        task = TASKS[n % len(TASKS)]
        i = 0
        while not stop.is_set():
            rid = f"r{n}-{i}"
            i += 1
            try:
                await ledger.reserve(task, "root", tokens=10, nanos=100, reservation_id=rid)
            except Exception as e:  # the same reservation id again: it lands once
                failures.append(type(e).__name__)
                await _until_done(
                    "reserve",
                    lambda t=task, r=rid: ledger.reserve(
                        t, "root", tokens=10, nanos=100, reservation_id=r
                    ),
                )
            try:
                await ledger.commit(task, rid, used=USED)
            except Exception as e:
                failures.append(type(e).__name__)
                await _until_done("commit", lambda t=task, r=rid: ledger.commit(t, r, used=USED))
            committed[task].append(rid)

    victim_port = replicated.masters()[0].port
    loops = [asyncio.create_task(loop(n)) for n in range(LOOPS)]
    await asyncio.sleep(1.0)
    before = sum(len(v) for v in committed.values())
    victim = next(n for n in replicated.nodes if n.port == victim_port)
    victim.kill()
    await asyncio.to_thread(replicated.wait_healthy, 30)  # the replica took over
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*loops)
    after = sum(len(v) for v in committed.values())
    assert before > 0
    assert after > before  # work went on across the failover
    assert failures == []  # every command rode the failover out

    for task in TASKS:
        tree = await ledger.snapshot(task)
        rids = committed[task]
        # No money lost: everything the caller was told is committed is, once.
        assert tree.root.spent_tokens == USED.tokens * len(rids), task
        assert tree.root.spent_nanos == USED.nanos * len(rids), task
        # No money created: nothing is still held, nothing past the limit.
        assert tree.root.reserved_tokens == 0, task
        assert tree.root.reserved_nanos == 0, task
        raw = await ledger.redis.hgetall(TaskKeys(task).reservations)
        assert set(raw) == set(rids), task
        for rid in rids:
            record = await ledger.reservation(task, rid)
            assert record.state is ReservationState.COMMITTED, (task, rid)
            assert (record.used_tokens, record.used_nanos) == (USED.tokens, USED.nanos)
        await ledger.close_task(task)
        assert (await ledger.snapshot(task)).status == "closed"
    await ledger.aclose()
