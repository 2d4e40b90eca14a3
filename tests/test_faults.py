"""Fault injection, Redis side: every fault x every phase of a task, one worker process.

A worker reaches Redis through the proxy of ``tests/faults.py``; a fault is injected
while the task plans, while its subtasks run, or while it settles (the synthesis call's
commit runs on Redis and its reply is lost, so the worker must retry it without paying
twice; then the task is closed and acknowledged through the outage). Faults:

- ``drop``: every connection reset once (clients reconnect at once);
- ``refuse``: every connection reset and none accepted for 2 s (a restart, as seen
  from outside).

After each, the same promises are checked: the worker is alive, the task reached one
final status (``succeeded``, logged finished once, acknowledged, nothing dead-lettered),
every model call was paid exactly once (one reservation and one commit per call, each
role called once), no hold leaked (no reservation open or expired), and the books
balance within the budget.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Amount, Budget, Ledger
from budgets.keys import QUEUE, WORKER_GROUP
from orchestrator.api import Paymaster
from orchestrator.queue import TaskQueue
from orchestrator.records import Status
from tests.faults import Fault, RedisProxy, WorkerProcess, keyed_endpoints
from tests.test_orchestrator import (
    assert_books_clean,
    calls_for,
    responder,
    role_of,
    stub_config,
    sub,
    wait_for,
)

Phase = Literal["planning", "subtasks", "settling"]

#: How long ``refuse`` keeps Redis away; the worker rides it out in place (window 5 s).
OUTAGE_S = 2.0
ROLES = ("plan", "a", "b", "c", "synth")
#: The calls whose arrival at the stub sets a fault off (settling arms the proxy instead).
TRIGGERS: dict[str, set[str]] = {"planning": {"plan"}, "subtasks": {"a", "b"}, "settling": set()}

pytestmark = pytest.mark.slow


@pytest.fixture
async def pm(redis_url: str, stub: ScriptedModelServer, tmp_path: Path) -> AsyncIterator[Paymaster]:
    paymaster = Paymaster(
        redis_url=redis_url, config=stub_config(stub), env={"HOME": str(tmp_path)}
    )
    yield paymaster
    await paymaster.aclose()


@pytest.fixture
def worker_through_proxy(
    env: dict[str, str], stub: ScriptedModelServer, tmp_path: Path, redis_proxy: RedisProxy
) -> Iterator[Callable[[], WorkerProcess]]:
    config = keyed_endpoints(tmp_path / "keyed.toml", stub.base_url)
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        w = WorkerProcess(
            {
                **env,
                "REDIS_URL": redis_proxy.url,
                "PAYMASTER_CONFIG": str(config),
                "PAYMASTER_VISIBILITY_TIMEOUT_S": "5",
                "PAYMASTER_LEASE_S": "30",
            },
            tmp_path / "worker.log",
            "worker-f",
        )
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def _inject(proxy: RedisProxy, fault: Fault) -> None:
    if fault == "drop":
        proxy.drop()
    else:
        proxy.refuse(OUTAGE_S)


@pytest.mark.parametrize("phase", ["planning", "subtasks", "settling"])
@pytest.mark.parametrize("fault", ["drop", "refuse"])
async def test_a_redis_fault_leaves_one_final_status_and_every_call_paid_once(
    fault: Fault,
    phase: Phase,
    pm: Paymaster,
    stub: ScriptedModelServer,
    redis_proxy: RedisProxy,
    worker_through_proxy: Callable[[], WorkerProcess],
) -> None:
    injected = threading.Event()
    base = responder([sub("a"), sub("b"), sub("c", "a", "b")])

    def respond(request: RecordedRequest) -> Reply:
        # The fault goes in as the stub hears the phase's first call, which then takes
        # 0.6 s: its commit meets the outage.
        role, reply = role_of(request), base(request)
        if role not in TRIGGERS[phase]:
            return reply
        if not injected.is_set():
            injected.set()
            _inject(redis_proxy, fault)
        return Reply(text=reply.text, delay_s=0.6)

    stub.responder = respond
    fired = None
    if phase == "settling":
        fired = redis_proxy.on_command(
            b"commit", b'"step": "synthesize"', fault=fault, seconds=OUTAGE_S
        )
    w = worker_through_proxy()
    budget = Budget(tokens=30_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    await w.ready()
    rec = await task.result(timeout=40)
    if fired is not None:
        assert fired.is_set(), "the synthesis commit never went through the proxy"
    else:
        assert injected.is_set()
    assert redis_proxy.faults, "no fault was injected"

    # The worker lived through it and the task ended once.
    assert w.alive, w.text()
    assert rec.status is Status.SUCCEEDED, (rec.error, w.text())
    assert rec.deliveries == 1  # ridden out in place: never handed back
    await wait_for(lambda: w.count(f"finished task {task.id}"), what="the finished line")
    assert w.count(f"finished task {task.id}") == 1
    assert "Traceback" not in w.text()
    client = pm.books.redis
    assert await client.xpending_range(QUEUE, WORKER_GROUP, "-", "+", 10) == []
    assert await client.xlen(QUEUE) == 0  # acknowledged and trimmed
    assert await TaskQueue(client).dead() == []
    if fault == "refuse":
        assert w.count("Redis unreachable") == 1, w.text()
        assert w.count("Redis back") == 1, w.text()
    else:  # a reset connection is retried at once: no outage to speak of
        assert w.count("Redis unreachable") == w.count("Redis back") <= 1

    # Every call paid once; no hold leaked; the books balance.
    assert [len(calls_for(stub, r)) for r in ROLES] == [1] * len(ROLES)
    events = await pm.aevents(task.id)
    ops = [e.op for e in events]
    assert ops.count("reserve") == ops.count("commit") == len(ROLES), ops
    assert "expire" not in ops
    assert "release" not in ops
    tree = await pm.aledger(task.id)
    assert_books_clean(tree, budget)
    assert tree.root.total_spent_tokens == sum(e.tokens for e in events if e.op == "commit")


async def test_connections_dropped_under_load_lose_no_operation_and_pay_none_twice(
    redis_proxy: RedisProxy, redis_url: str
) -> None:
    # 64 loops reserve and commit through the proxy while every connection is reset
    # five times: the batches' own connection and the pool's reconnect, each cut-off
    # batch is sent again (every operation is idempotent), and the books agree with
    # what the callers were told to the token.
    setup = Ledger.from_url(redis_url)
    await setup.open_task("drops", Budget(tokens=10**9, usd="1000"))
    ledger = Ledger.from_url(redis_proxy.url)
    told: list[int] = []
    stop = asyncio.Event()

    async def loop(n: int) -> None:
        i = 0
        while not stop.is_set():
            rid = f"l{n}-{i}"
            hold = await ledger.reserve("drops", "root", tokens=100, nanos=100, reservation_id=rid)
            done = await ledger.commit("drops", hold.id, used=Amount(tokens=n + 1, nanos=1))
            told.append(done.tokens)
            i += 1

    loops = [asyncio.create_task(loop(n)) for n in range(64)]
    for _ in range(5):
        await asyncio.sleep(0.3)
        redis_proxy.drop()
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loops), timeout=30)
    await ledger.aclose()
    assert len(redis_proxy.faults) == 5
    assert len(told) > 64 * 5
    root = (await setup.snapshot("drops")).root
    await setup.aclose()
    assert root.spent_tokens == sum(told)  # each commit counted once, none lost
    assert root.reserved_tokens == 0
    assert root.open_reservations == 0
