"""Owned deliveries: a task runs once, and workers ride out Redis outages.

Worker processes reach Redis through the TCP proxy of ``tests/faults.py`` (or a real
redis-server that is restarted), the scripted model server answers, and each test asserts
what a user would: the worker is still alive, the task ends once, nothing is paid twice
and the books balance. The stub knows which worker called by the key each one sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rex

from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Budget
from budgets.connection import Client
from budgets.keys import QUEUE, SHARED_SCOPE, WORKER_GROUP, WORKERS, outcome_id
from budgets.stats import StatsBook
from orchestrator.api import Paymaster
from orchestrator.outage import Outage, riding_client
from orchestrator.queue import TaskQueue
from orchestrator.records import Records, Status, TaskRecord
from orchestrator.redis_server import RedisServer, free_port
from orchestrator.settings import Settings
from orchestrator.worker import RedactingFormatter, Worker
from tests.faults import REPO, RedisProxy, WorkerProcess, caller, keyed_endpoints
from tests.test_orchestrator import (
    assert_books_clean,
    calls_for,
    responder,
    stub_config,
    sub,
    wait_for,
    worker_text,
)


@pytest.fixture
async def pm(redis_url: str, stub: ScriptedModelServer, tmp_path: Path) -> AsyncIterator[Paymaster]:
    paymaster = Paymaster(
        redis_url=redis_url, config=stub_config(stub), env={"HOME": str(tmp_path)}
    )
    yield paymaster
    await paymaster.aclose()


class Workers:
    """Starts named worker processes; keyword arguments override their environment."""

    def __init__(self, env: dict[str, str], config: Path, logs: Path) -> None:
        self._env = {**env, "PAYMASTER_CONFIG": str(config)}
        self._logs = logs
        self.started: list[WorkerProcess] = []

    def __call__(self, name: str, *, key: str | None = None, **extra: str) -> WorkerProcess:
        w = WorkerProcess({**self._env, **extra}, self._logs / f"{name}.log", name, key=key)
        self.started.append(w)
        return w


@pytest.fixture
def start(env: dict[str, str], stub: ScriptedModelServer, tmp_path: Path) -> Iterator[Workers]:
    workers = Workers(env, keyed_endpoints(tmp_path / "keyed.toml", stub.base_url), tmp_path)
    yield workers
    for w in workers.started:
        w.stop()


def chats(srv: ScriptedModelServer) -> list[RecordedRequest]:
    return [r for r in srv.requests if r.path.endswith("/chat/completions")]


async def pending(client: Client) -> list[dict[str, Any]]:
    rows = await client.xpending_range(QUEUE, WORKER_GROUP, "-", "+", 100)
    return list(rows)


# -- the queue's fencing and trimming, on a real Redis --------------------------------------


async def test_a_taken_over_delivery_is_never_claimed_back_by_its_first_holder(
    redis_url: str,
) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    first, second = TaskQueue(client, consumer="first"), TaskQueue(client, consumer="second")
    await first.ensure_group()
    await first.enqueue("t1")
    (held,) = await first.take(count=1, block_ms=100)
    assert held.deliveries == 1
    assert await first.owns(held)
    await asyncio.sleep(0.05)
    # ``second`` takes it over after 30 ms of silence: the count (the token) goes up.
    (taken,) = await second.take_over(idle_ms=30, count=5)
    assert (taken.consumer, taken.deliveries) == ("second", 2)
    assert not await first.owns(held)
    assert await second.owns(taken)
    # The first holder's heartbeat reports the loss and changes nothing.
    assert await first.keep_alive([held]) == [held]
    (row,) = await pending(client)
    assert (row["consumer"], row["times_delivered"]) == ("second", 2)
    # Nor can it acknowledge (or dead-letter) what is no longer its own.
    assert await first.ack(held) is False
    assert await first.dead_letter(held, reason="stale") is False
    assert await first.dead() == []
    assert len(await pending(client)) == 1
    # A worker never takes its own running delivery again, even when it has gone idle.
    await asyncio.sleep(0.05)
    assert await second.take_over(idle_ms=30, count=5, running=[taken.message_id]) == []
    assert await second.keep_alive([taken]) == []  # refreshed: still the same token
    assert await second.ack(taken) is True
    assert await pending(client) == []
    await client.aclose()


async def test_acknowledged_entries_are_trimmed_and_dead_letters_capped(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    queue = TaskQueue(client, consumer="w", dead_letter_max=5)
    await queue.ensure_group()
    for i in range(50):
        await queue.enqueue(f"t{i}")
    taken = await queue.take(count=50, block_ms=100)
    assert len(taken) == 50
    # The oldest stays pending: nothing at or after it may go; every other acked entry does.
    for d in taken[1:30]:
        assert await queue.ack(d)
    assert await client.xlen(QUEUE) == 50 - 29
    assert await queue.ack(taken[0])
    assert await client.xlen(QUEUE) == 20  # the 20 still pending
    for d in taken[30:]:
        assert await queue.ack(d)
    assert await client.xlen(QUEUE) == 0
    # Entries not delivered yet are never trimmed.
    for i in range(3):
        await queue.enqueue(f"u{i}")
    (one,) = await queue.take(count=1, block_ms=100)
    assert await queue.ack(one)
    assert await client.xlen(QUEUE) == 2
    for d in await queue.take(count=5, block_ms=100):
        assert await queue.dead_letter(d, reason="test")
    for i in range(10):
        await queue.enqueue(f"d{i}")
    for d in await queue.take(count=10, block_ms=100):
        assert await queue.dead_letter(d, reason="test")
    assert await client.xlen(QUEUE) == 0
    dead = await queue.dead()
    assert [d["task_id"] for d in dead] == [f"d{i}" for i in range(9, 4, -1)]  # the 5 newest
    # A consumer silent for long with nothing pending is forgotten; one holding work is not.
    await queue.enqueue("kept")
    await TaskQueue(client, consumer="holder").take(count=1, block_ms=100)
    await asyncio.sleep(0.05)
    assert await queue.forget_consumers(idle_ms=30) == 1  # "w" goes, "holder" stays
    consumers = await client.xinfo_consumers(QUEUE, WORKER_GROUP)
    assert [c["name"] for c in consumers] == ["holder"]
    await client.aclose()


# -- one command through an outage: the client's retry and its log -----------------------------


async def test_a_command_rides_out_a_short_outage_and_it_is_logged_once(
    redis_proxy: RedisProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.outage")
    outage = Outage()
    client = riding_client(redis_proxy.url, outage=outage, window_s=3.0)
    await client.set("k", "v")
    redis_proxy.refuse(0.8)
    began = time.monotonic()
    await asyncio.gather(*(client.get("k") for _ in range(5)))  # five commands, one outage
    assert 0.7 < time.monotonic() - began < 2.5
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("Redis unreachable") for line in lines) == 1, lines
    assert sum(line.startswith("Redis back after") for line in lines) == 1, lines
    assert not outage.down
    assert outage.count == 1
    await client.aclose()


async def test_dropped_connections_are_retried_at_once_and_no_outage_is_reported(
    redis_proxy: RedisProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.outage")
    outage = Outage()
    client = riding_client(redis_proxy.url, outage=outage, window_s=3.0)

    async def blocked_reads() -> None:
        for _ in range(5):
            await client.xread({"nothing": "$"}, block=200)

    reading = asyncio.create_task(blocked_reads())
    for _ in range(4):
        await asyncio.sleep(0.15)
        redis_proxy.drop()
    await reading
    assert outage.count == 0
    assert caplog.records == []
    await client.aclose()


async def test_a_command_gives_up_after_the_window_when_redis_stays_away(
    redis_proxy: RedisProxy,
) -> None:
    outage = Outage()
    client = riding_client(redis_proxy.url, outage=outage, window_s=0.6)
    await client.ping()
    redis_proxy.refuse(5.0)
    began = time.monotonic()
    with pytest.raises(rex.ConnectionError):
        await client.get("k")
    assert 0.4 < time.monotonic() - began < 2.0
    assert outage.down
    await client.aclose()


# -- workers and the heartbeat through Redis outages -------------------------------------------


@pytest.fixture
def two_proxies(redis_server: RedisServer) -> Iterator[dict[str, RedisProxy]]:
    """One proxy per worker, so the test can cut off whichever worker holds the task."""
    with (
        RedisProxy(upstream_port=redis_server.port) as one,
        RedisProxy(upstream_port=redis_server.port) as two,
    ):
        yield {"worker-a": one, "worker-b": two}


def _two_workers(start: Workers, proxies: dict[str, RedisProxy], **env: str) -> None:
    for name, proxy in proxies.items():
        start(name, REDIS_URL=proxy.url, **env)


async def _holder(stub: ScriptedModelServer, role: str) -> str:
    """Which worker made the first call for ``role`` (waiting for it)."""
    await wait_for(lambda: calls_for(stub, role), timeout=20, what=f"the call for {role}")
    return caller(calls_for(stub, role)[0])


async def test_the_heartbeat_rides_out_redis_errors_and_no_other_worker_takes_the_task(
    pm: Paymaster,
    stub: ScriptedModelServer,
    start: Workers,
    two_proxies: dict[str, RedisProxy],
) -> None:
    stub.responder = responder(
        [sub("a")], lambda sid, req: Reply(text=worker_text(sid), delay_s=6.0)
    )
    # Either worker takes the other's task over once it has been silent for 6 s: the
    # 3.5 s cut-off below plus the backoff and a loaded machine's delays stay inside it.
    _two_workers(start, two_proxies, PAYMASTER_VISIBILITY_TIMEOUT_S="6", PAYMASTER_LEASE_S="30")
    workers = start.started
    for w in workers:
        await w.ready()
    budget = Budget(tokens=20_000)
    task = await pm.asubmit("do the thing", budget=budget)
    holder = await _holder(stub, "a")
    proxy = two_proxies[holder]
    holding, other = sorted(workers, key=lambda w: w.name != holder)
    for _ in range(5):  # every connection of the holder dropped, again and again...
        proxy.drop()
        await asyncio.sleep(0.2)
    proxy.refuse(2.5)  # ...then none accepted for 2.5 s
    await asyncio.sleep(2.5)
    assert proxy.wait_listening()
    client = pm.books.redis

    async def refreshed() -> bool:
        rows = await pending(client)
        return bool(rows) and rows[0]["time_since_delivered"] < 1_000

    # Once Redis is back the heartbeat goes on: the delivery is fresh and still the holder's.
    await wait_for(refreshed, timeout=3, what="the heartbeat after the outage")
    (row,) = await pending(client)
    assert (row["consumer"], row["times_delivered"]) == (holder, 1)
    beat = json.loads(str(await client.hget(WORKERS, holder)))["at_s"]
    await asyncio.sleep(0.6)
    assert json.loads(str(await client.hget(WORKERS, holder)))["at_s"] > beat
    rec = await task.result(timeout=20)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.deliveries == 1
    assert {caller(r) for r in chats(stub)} == {holder}
    assert len(calls_for(stub, "a")) == 1
    assert other.count("took task") == 0
    # Each outage it noticed is one line when it starts and one when it ends; how many
    # of the six (five drops, one refusal) a heartbeat lands in depends on timing.
    outages = holding.count("Redis unreachable")
    assert 1 <= outages <= 6, holding.text()
    assert holding.count("Redis back") == outages, holding.text()
    assert holding.alive
    assert other.alive
    assert_books_clean(await pm.aledger(task.id), budget)
    assert await pending(client) == []


async def test_a_worker_whose_delivery_was_taken_over_stops_before_its_next_paid_call(
    pm: Paymaster,
    stub: ScriptedModelServer,
    start: Workers,
    two_proxies: dict[str, RedisProxy],
) -> None:
    first: list[str] = []

    def worker(sid: str, req: RecordedRequest) -> Reply:
        if not first:  # the first call for a is still out when its worker is cut off
            first.append(caller(req))
            return Reply(text=worker_text(sid), delay_s=5.0)
        return Reply(text=worker_text(sid), delay_s=1.0)

    stub.responder = responder([sub("a"), sub("b", "a")], worker)
    _two_workers(start, two_proxies)  # visibility timeout 1 s
    workers = start.started
    for w in workers:
        await w.ready()
    budget = Budget(tokens=20_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    loser = await _holder(stub, "a")
    cut_off, taker = sorted(workers, key=lambda w: w.name != loser)
    two_proxies[loser].refuse(3.0)  # cut off for 3 s, past its visibility timeout
    client = pm.books.redis

    async def taken_over() -> bool:
        rows = await pending(client)
        return bool(rows) and rows[0]["consumer"] == taker.name

    await wait_for(taken_over, timeout=10, what="the takeover")
    taken_at = len(stub.requests)
    assert two_proxies[loser].wait_listening()
    # Redis is back for the loser while the taker still works: the loser's heartbeat
    # never claims the task back.
    deadline = time.monotonic() + 10
    while (rows := await pending(client)) and not cut_off.count("lost task"):
        assert rows[0]["consumer"] == taker.name, rows
        assert time.monotonic() < deadline, cut_off.text()
        await asyncio.sleep(0.05)
    rec = await task.result(timeout=30)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.deliveries == 2
    await wait_for(lambda: cut_off.count("stopped task"), timeout=15, what="the loser stopping")
    # The loser made its planning call and the call for a that was out when it was cut
    # off; nothing after the takeover.
    assert [caller(r) for r in chats(stub)[:2]] == [loser, loser]
    after = [caller(r) for r in stub.requests[taken_at:] if r.path.endswith("/chat/completions")]
    assert after
    assert set(after) == {taker.name}
    assert sum(caller(r) == loser for r in chats(stub)) == 2
    assert cut_off.count("finished task") == 0
    assert taker.count(f"finished task {task.id}: succeeded") == 1
    assert cut_off.alive
    assert taker.alive
    assert_books_clean(await pm.aledger(task.id), budget)  # the loser's late commit too
    assert await pending(client) == []
    assert await TaskQueue(client).dead() == []


async def test_a_worker_killed_after_paying_for_a_subtask_never_has_it_paid_for_again(
    pm: Paymaster,
    stub: ScriptedModelServer,
    start: Workers,
    redis_proxy: RedisProxy,
    redis_url: str,
) -> None:
    stub.responder = responder([sub("a"), sub("b", "a")])
    # Redis runs the commit of a's call, the reply never reaches the worker, and
    # Redis stays away while the worker is killed: it paid and saved nothing else.
    fired = redis_proxy.on_command(b"commit", b'"subtask": "a"', fault="refuse", seconds=30)
    dying = start("worker-a", REDIS_URL=redis_proxy.url)
    budget = Budget(tokens=20_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    await dying.ready()
    await asyncio.to_thread(fired.wait, 20)
    assert fired.is_set(), dying.text()
    dying.proc.kill()
    dying.proc.wait(10)
    taker = start("worker-b", REDIS_URL=redis_url)
    rec = await task.result(timeout=30)
    assert rec.status is Status.SUCCEEDED, (rec.error, taker.text())
    assert rec.deliveries == 2
    # The reply paid for by the dead worker is a's result: one call for a in all.
    assert [len(calls_for(stub, r)) for r in ("plan", "a", "b")] == [1, 1, 1]
    assert [caller(r) for r in calls_for(stub, "a")] == ["worker-a"]
    result_a = (await Records(pm.books.redis).load_results(task.id))["a"]
    assert result_a["text"] == worker_text("a")
    assert result_a["outcome"] == outcome_id(task.id, "root/a.1.1")  # the account that paid
    tree = await pm.aledger(task.id)
    assert tree.account("root/a.1.1").spent_tokens == result_a["tokens"] > 0
    paths = {acct.path for acct in tree.walk()}
    assert "root/a.2.1" not in paths  # delivery 2 opened no account for a
    assert "root/b.2.1" in paths
    stats = await StatsBook(pm.books.redis).read(SHARED_SCOPE)
    assert stats.cell("stub").calls == 2  # a and b, each counted once
    assert_books_clean(tree, budget)
    assert await pending(pm.books.redis) == []


async def test_the_worker_hands_a_task_back_through_an_outage_longer_than_it_rides_out(
    pm: Paymaster, stub: ScriptedModelServer, start: Workers, redis_proxy: RedisProxy
) -> None:
    def worker(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text=worker_text(sid), delay_s=0.5 if sid == "b" else 0.0)

    stub.responder = responder([sub("a"), sub("b", "a"), sub("c", "b")], worker)
    w = start("worker-a", REDIS_URL=redis_proxy.url)  # rides out 1 s (its visibility timeout)
    budget = Budget(tokens=20_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    await w.ready()
    await wait_for(lambda: calls_for(stub, "b"), timeout=20, what="the call for b")
    redis_proxy.refuse(6.0)
    await asyncio.sleep(6.0)
    assert redis_proxy.wait_listening()
    rec = await task.result(timeout=30)
    assert w.alive
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.deliveries == 2
    assert w.count(f"handed back task {task.id}: Redis unreachable") == 1, w.text()
    assert w.count("Redis unreachable") >= 1
    assert w.count("Redis back") >= 1
    assert "Traceback" not in w.text()
    # Saved results are not paid for again; b, cut off before it was settled, runs again.
    assert [len(calls_for(stub, r)) for r in ("plan", "a", "b", "c")] == [1, 1, 2, 1]
    assert_books_clean(await pm.aledger(task.id), budget)
    assert await pending(pm.books.redis) == []


async def test_a_commit_outlasts_an_outage_longer_than_the_window_until_its_lease_ends(
    pm: Paymaster, stub: ScriptedModelServer, start: Workers, redis_proxy: RedisProxy
) -> None:
    def worker(sid: str, req: RecordedRequest) -> Reply:
        if sid == "b" and not redis_proxy.faults:
            redis_proxy.refuse(4.0)  # b's reply arrives while Redis is away
            return Reply(text=worker_text(sid), delay_s=0.3)
        return Reply(text=worker_text(sid))

    stub.responder = responder([sub("a"), sub("b", "a"), sub("c", "b")], worker)
    # Commands ride out 1 s (the visibility timeout); the reservation's lease is 15 s.
    w = start("worker-a", REDIS_URL=redis_proxy.url, PAYMASTER_LEASE_S="15")
    budget = Budget(tokens=20_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    await w.ready()
    rec = await task.result(timeout=30)
    assert rec.status is Status.SUCCEEDED, (rec.error, w.text())
    assert redis_proxy.faults
    # The commit waited for Redis instead of giving up at the window: b was paid
    # once and called once; the task never left the worker.
    assert [len(calls_for(stub, r)) for r in ("plan", "a", "b", "c")] == [1, 1, 1, 1]
    assert rec.deliveries == 1, w.text()
    assert w.count("handed back task") == 0, w.text()
    assert w.count("waits for Redis") >= 1, w.text()
    tree = await pm.aledger(task.id)
    assert not [r for a in tree.walk() for r in a.reservations]
    assert tree.account("root/b.1.1").spent_tokens > 0
    assert_books_clean(tree, budget)


async def test_the_worker_rides_out_a_redis_restart(
    stub: ScriptedModelServer, start: Workers, tmp_path: Path
) -> None:
    (tmp_path / "aof").mkdir()
    server = RedisServer(aof=True, data_dir=tmp_path / "aof", port=free_port()).start()
    paymaster = Paymaster(
        redis_url=server.url, config=stub_config(stub), env={"HOME": str(tmp_path)}
    )
    try:
        stub.responder = responder(
            [sub("a"), sub("b", "a")],
            lambda sid, req: Reply(text=worker_text(sid), delay_s=2.0 if sid == "a" else 0.0),
        )
        w = start("worker-a", REDIS_URL=server.url, PAYMASTER_VISIBILITY_TIMEOUT_S="8")
        budget = Budget(tokens=20_000, usd="0.1")
        task = await paymaster.asubmit("do the thing", budget=budget)
        await w.ready()
        await wait_for(lambda: calls_for(stub, "a"), timeout=20, what="the call for a")
        await asyncio.to_thread(server.stop)  # SIGTERM: the AOF is written out
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)  # same port, same data, no scripts loaded
        rec = await _final_after_restart(paymaster, task.id)
        assert w.alive, w.text()
        assert rec.status is Status.SUCCEEDED, rec.error
        assert rec.deliveries == 1
        assert [len(calls_for(stub, r)) for r in ("plan", "a", "b", "synth")] == [1, 1, 1, 1]
        assert w.count("Redis unreachable") == 1, w.text()
        assert w.count("Redis back") == 1
        assert_books_clean(await paymaster.aledger(task.id), budget)
        assert await pending(paymaster.books.redis) == []
    finally:
        await paymaster.aclose()
        server.stop()


async def _final_after_restart(paymaster: Paymaster, task_id: str) -> TaskRecord:
    # This test's own client is not the worker's: its first command on a connection
    # the restart closed fails, and is tried again here.
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(rex.ConnectionError):
            return await paymaster.await_final(task_id, timeout=deadline - time.monotonic())
        await asyncio.sleep(0.1)


async def test_a_worker_started_while_redis_is_down_exits_4_with_one_line(
    env: dict[str, str],
) -> None:
    down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "orchestrator.cli", "worker"],
        env=down,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert "unavailable" in done.stderr or "unreachable" in done.stderr


# -- nothing grows for ever; nothing leaks -----------------------------------------------------


@pytest.mark.slow
async def test_a_thousand_tasks_leave_keys_and_memory_bounded(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> None:
    stub.responder = responder([sub("a")])
    settings = Settings(home=tmp_path, retention_s=2, visibility_timeout_s=30, heartbeat_s=1)
    paymaster = Paymaster(redis_url=redis_url, config=stub_config(stub), settings=settings)
    client = paymaster.books.redis
    worker = Worker(paymaster.runtime(), concurrency=32, name="w")
    running = asyncio.create_task(worker.run())
    try:
        # One task first, so every script is loaded and every shared key exists.
        first = await paymaster.asubmit("warm up", budget=Budget(tokens=5_000))
        await first.result(timeout=20)
        await wait_for(lambda: _dbsize_at_most(client, 8), timeout=20, what="warm-up expiry")
        keys_before = await client.dbsize()
        memory_before = await _data_memory(client)
        finished = _Lines()
        worker_log = logging.getLogger("orchestrator.worker")
        level = worker_log.level
        worker_log.setLevel(logging.INFO)
        worker_log.addHandler(finished)
        try:
            ids = {
                (await paymaster.asubmit(f"task {i}", budget=Budget(tokens=5_000))).id
                for i in range(1000)
            }
            # A record lives 2 s after its task ends: count the worker's lines instead.
            await wait_for(lambda: len(finished.succeeded) >= 1000, timeout=180, what="tasks")
        finally:
            worker_log.removeHandler(finished)
            worker_log.setLevel(level)
        assert finished.succeeded == ids
        keys_full = await client.dbsize()
        # Finished tasks keep their keys for their retention (those of the last 2 s are
        # still there: about a dozen keys each)...
        assert keys_full > keys_before + 100
        await wait_for(lambda: _dbsize_at_most(client, keys_before + 2), timeout=60, what="expiry")
        memory_after = await _data_memory(client)
        peak = int((await client.info("memory"))["used_memory_peak"])
        # ...then nothing of them is left: the queue holds no acknowledged entry.
        assert await client.xlen(QUEUE) == 0
        assert await client.dbsize() <= keys_before + 2
        left = [await client.memory_usage(k) or 0 for k in await client.keys("*")]
        assert sum(left) < 4_096, left
        assert memory_after <= memory_before + 256 * 1024, (memory_before, memory_after)
        print(
            f"\nkeys: {keys_before} before, {keys_full} after 1,000 tasks, "
            f"{await client.dbsize()} after expiry ({sum(left)} bytes); used_memory less "
            f"clients: {memory_before:,} before, {memory_after:,} after (peak {peak:,})",
            file=sys.stderr,
        )
    finally:
        worker.stopping.set()
        await asyncio.wait_for(running, 30)
        await paymaster.aclose()


class _Lines(logging.Handler):
    """Collects the ids of the tasks a worker logged as succeeded."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.succeeded: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("finished task ") and ": succeeded" in message:
            self.succeeded.add(message.split()[2].rstrip(":"))


async def _data_memory(client: Client) -> int:
    """Redis's memory less its clients' buffers (the pool's connections are not data)."""
    info = await client.info("memory")
    return int(info["used_memory"]) - int(info["mem_clients_normal"])


async def _dbsize_at_most(client: Client, most: int) -> bool:
    return int(await client.dbsize()) <= most


def test_the_worker_log_redacts_credentials_in_messages_and_tracebacks() -> None:
    key = "sk-live-0123456789abcdefSECRET"
    try:
        try:
            raise RuntimeError(f"Incorrect API key provided: {key}")
        except RuntimeError as inner:
            raise ValueError("the call failed") from inner
    except ValueError:
        record = logging.LogRecord(
            "orchestrator.worker", logging.ERROR, __file__, 1, "task %s failed with %s", None, None
        )
        record.args = ("t1", f"Authorization: Bearer {key}")
        record.exc_info = sys.exc_info()
    text = RedactingFormatter("%(levelname)s %(message)s").format(record)
    assert key not in text
    assert "[REDACTED]" in text
    assert "Incorrect API key provided" in text  # what happened is still said
    assert "task t1 failed" in text


async def test_a_key_echoed_by_the_provider_never_reaches_the_worker_log(
    pm: Paymaster, stub: ScriptedModelServer, start: Workers
) -> None:
    key = "sk-test-9f8e7d6c5b4a3210SECRET"

    def echo(request: RecordedRequest) -> Reply:
        sent = request.headers.get("authorization", "")
        return Reply(text=f"Incorrect API key provided: {sent.removeprefix('Bearer ')}", status=401)

    stub.responder = echo
    w = start("worker-a", key=key, PAYMASTER_MAX_DELIVERIES="1")
    task = await pm.asubmit("doomed", budget=Budget(tokens=20_000))
    await w.ready()
    rec = await task.result(timeout=20)
    assert rec.status is Status.FAILED
    assert any(caller(r) == key for r in chats(stub))  # the key was sent, and echoed
    await wait_for(lambda: "finished task" in w.text(), what="the worker's log line")
    text = w.text()
    assert key not in text
    assert "[REDACTED]" in text, text
