"""Many reservations at once: from several OS processes, and from hundreds of coroutines.

The ledger's promise under load is that an account never hands out more than
it holds: every reservation is checked and taken in one atomic script, so
racing clients cannot both win the last slot, and every settlement is counted
exactly once.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from budgets import Amount, Budget, BudgetExceeded, Ledger, TaskTree
from budgets.keys import ROOT

pytestmark = pytest.mark.both_redis

TASK = "race"
POOL = "root/pool"
#: The pool fits exactly this many reservations of ``SIZE``.
SLOTS = 50
SIZE = Amount(tokens=100, nanos=1000)
PROCESSES = 4
ATTEMPTS = 100  # per process
COROUTINES = 64  # per process, at once
#: How long a child process may take to start, race and report.
CHILD_TIMEOUT_S = 60.0

Usage = Literal["all", "less"]
Batching = Literal["none", "half"]


@dataclass(frozen=True, slots=True)
class Tally:
    """What one process saw: wins, refusals, and what its wins reported as used."""

    worker: int
    won: int
    refused: int
    used_tokens: int
    used_nanos: int


def usage_of(attempt: int, usage: Usage) -> Amount:
    """What attempt number ``attempt`` reports as used: everything, or a varying part."""
    if usage == "all":
        return SIZE
    return Amount(tokens=10 + attempt * 37 % 90, nanos=100 + attempt * 53 % 900)


async def _race(url: str, worker: int, usage: Usage, batch: bool, barrier: Any) -> Tally:
    ledger = Ledger.from_url(url, batch=batch)
    try:
        await ledger.ping()
        # Every process is connected before any of them reserves.
        await asyncio.to_thread(barrier.wait, CHILD_TIMEOUT_S)
        attempts = iter(range(worker * ATTEMPTS, (worker + 1) * ATTEMPTS))
        outcome: Counter[str] = Counter()

        async def attempt_all() -> None:
            for n in attempts:  # the coroutines share one iterator
                try:
                    res = await ledger.reserve(TASK, POOL, tokens=SIZE.tokens, nanos=SIZE.nanos)
                except BudgetExceeded:
                    outcome["refused"] += 1
                    continue
                used = usage_of(n, usage)
                done = await ledger.commit(TASK, res.id, used=used)
                assert (done.tokens, done.nanos) == (used.tokens, used.nanos)
                assert (done.overrun_tokens, done.overrun_nanos) == (0, 0)
                outcome["won"] += 1
                outcome["used_tokens"] += used.tokens
                outcome["used_nanos"] += used.nanos

        await asyncio.gather(*(attempt_all() for _ in range(COROUTINES)))
        return Tally(
            worker=worker,
            won=outcome["won"],
            refused=outcome["refused"],
            used_tokens=outcome["used_tokens"],
            used_nanos=outcome["used_nanos"],
        )
    finally:
        await ledger.aclose()


def race_in_child(
    url: str, worker: int, usage: Usage, batch: bool, barrier: Any, results: Any
) -> None:
    """A child process's body: race with its own ledger, report on ``results``."""
    try:
        results.put(asyncio.run(_race(url, worker, usage, batch, barrier)))
    except BaseException as e:
        results.put(f"worker {worker} failed: {e!r}")
        raise


def race_in_processes(url: str, usage: Usage, *, batching: Batching) -> list[Tally]:
    """Run :data:`PROCESSES` spawned processes against the pool; return their tallies.

    With ``batching="none"`` every operation is its own script call, so the
    processes' calls interleave one by one in Redis; with ``"half"`` the even
    workers batch what their coroutines have in flight, so batches race single
    calls.
    """
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=race_in_child,
            args=(url, worker, usage, batching == "half" and worker % 2 == 0, barrier, results),
            name=f"ledger-race-{worker}",
        )
        for worker in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        replies = []
        for _ in procs:
            try:
                replies.append(results.get(timeout=CHILD_TIMEOUT_S))
            except queue.Empty:
                raise AssertionError("a racing process did not report in time") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failures = [r for r in replies if not isinstance(r, Tally)]
    assert not failures, failures
    assert all(proc.exitcode == 0 for proc in procs)
    return sorted(replies, key=lambda t: t.worker)


def assert_sound(tree: TaskTree) -> None:
    """Nothing over a limit, nothing held, nothing overrun, every carve accounted for."""
    for acct in tree.walk():
        assert acct.reserved_tokens == acct.reserved_nanos == 0, acct.path
        assert acct.reservations == [], acct.path
        assert acct.open_reservations == 0, acct.path
        assert acct.overrun_tokens == acct.overrun_nanos == 0, acct.path
        for room in (acct.room_tokens, acct.room_nanos):
            assert room is None or room >= 0, acct.path
        if acct.limit_tokens is not None:
            assert acct.total_spent_tokens <= acct.limit_tokens, acct.path
        if acct.limit_nanos is not None:
            assert acct.total_spent_nanos <= acct.limit_nanos, acct.path
        kids = [c for c in acct.children if not c.closed]
        assert acct.carved_tokens == sum(c.limit_tokens or 0 for c in kids), acct.path
        assert acct.carved_nanos == sum(c.limit_nanos or 0 for c in kids), acct.path


async def open_pool(ledger: Ledger) -> None:
    """A root twice the pool's size, and the pool, which fits exactly :data:`SLOTS`."""
    pool = Budget.from_nanos(tokens=SLOTS * SIZE.tokens, nanos=SLOTS * SIZE.nanos)
    await ledger.open_task(
        TASK, Budget.from_nanos(tokens=2 * SLOTS * SIZE.tokens, nanos=2 * SLOTS * SIZE.nanos)
    )
    await ledger.open_account(TASK, POOL, pool)


async def test_processes_racing_for_the_last_slots_win_exactly_what_fits(
    ledger: Ledger, redis_url: str
) -> None:
    await open_pool(ledger)
    tallies = await asyncio.to_thread(race_in_processes, redis_url, "all", batching="none")

    won = sum(t.won for t in tallies)
    assert won == SLOTS
    assert won + sum(t.refused for t in tallies) == PROCESSES * ATTEMPTS
    tree = await ledger.snapshot(TASK)
    assert_sound(tree)
    pool = tree.account(POOL)
    assert (pool.spent_tokens, pool.spent_nanos) == (SLOTS * SIZE.tokens, SLOTS * SIZE.nanos)
    assert (pool.room_tokens, pool.room_nanos) == (0, 0)
    # The root lent the pool its share and spent nothing itself.
    assert (tree.root.spent_tokens, tree.root.spent_nanos) == (0, 0)
    assert (tree.root.room_tokens, tree.root.room_nanos) == (pool.limit_tokens, pool.limit_nanos)
    events = Counter(e.op for e in await ledger.events(TASK))
    assert events["reserve"] == events["commit"] == SLOTS
    assert events["overrun"] == events["expire"] == 0


async def test_usage_below_the_reservation_lets_more_calls_through_but_never_too_many(
    ledger: Ledger, redis_url: str
) -> None:
    await open_pool(ledger)
    tallies = await asyncio.to_thread(race_in_processes, redis_url, "less", batching="half")

    won = sum(t.won for t in tallies)
    spent = (sum(t.used_tokens for t in tallies), sum(t.used_nanos for t in tallies))
    assert won + sum(t.refused for t in tallies) == PROCESSES * ATTEMPTS
    tree = await ledger.snapshot(TASK)
    assert_sound(tree)
    pool = tree.account(POOL)
    assert (pool.spent_tokens, pool.spent_nanos) == spent
    limit = (SLOTS * SIZE.tokens, SLOTS * SIZE.nanos)
    assert (pool.limit_tokens, pool.limit_nanos) == limit
    assert spent[0] <= limit[0]
    assert spent[1] <= limit[1]
    # A refusal means the held and spent amounts left less than one SIZE, and
    # each win holds at most one SIZE: so at least SLOTS won, unless all did.
    assert won >= SLOTS
    events = Counter(e.op for e in await ledger.events(TASK))
    assert events["reserve"] == events["commit"] == won
    # Nothing is left held: what remains can be reserved, and no more.
    room = (limit[0] - spent[0], limit[1] - spent[1])
    assert (pool.room_tokens, pool.room_nanos) == room
    for _ in range(min(room[0] // SIZE.tokens, room[1] // SIZE.nanos)):
        await ledger.reserve(TASK, POOL, tokens=SIZE.tokens, nanos=SIZE.nanos)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(TASK, POOL, tokens=SIZE.tokens, nanos=SIZE.nanos)


# -- hundreds of coroutines on one ledger: the batching runner ----------------------------

BATCH_TASKS = ("batch-a", "batch-b")
BATCH_ACCOUNTS = {
    ROOT: Budget.from_nanos(tokens=20_000, nanos=200_000),
    "root/a": Budget.from_nanos(tokens=4_000, nanos=40_000),
    "root/a/x": Budget.from_nanos(tokens=1_000, nanos=10_000),
    "root/b": Budget.from_nanos(tokens=3_000, nanos=30_000),
}
CALLS = 800
HOLD = Amount(tokens=50, nanos=500)
LESS = Amount(tokens=20, nanos=200)

Action = Literal["commit", "commit less", "estimate", "release", "commit twice"]
ACTIONS: tuple[Action, ...] = ("commit", "commit less", "estimate", "release", "commit twice")


@dataclass(frozen=True, slots=True)
class Outcome:
    task_id: str
    account: str
    action: Action | Literal["refused"]
    used: Amount


async def one_call(ledger: Ledger, n: int) -> Outcome:
    """Reserve, then settle one of five ways (or be refused)."""
    task_id = BATCH_TASKS[n % len(BATCH_TASKS)]
    paths = list(BATCH_ACCOUNTS)
    account = paths[n // len(BATCH_TASKS) % len(paths)]
    action = ACTIONS[n // (len(BATCH_TASKS) * len(paths)) % len(ACTIONS)]
    try:
        res = await ledger.reserve(task_id, account, tokens=HOLD.tokens, nanos=HOLD.nanos)
    except BudgetExceeded:
        return Outcome(task_id, account, "refused", Amount())
    if action == "release":
        assert await ledger.release(task_id, res.id) is False
        return Outcome(task_id, account, action, Amount())
    if action == "estimate":
        done = await ledger.commit(task_id, res.id, used=None)
        assert done.estimated
        return Outcome(task_id, account, action, HOLD)
    used = HOLD if action == "commit" else LESS
    if action == "commit twice":
        # A retry racing the first commit in the same batch gets the same answer.
        first, again = await asyncio.gather(
            ledger.commit(task_id, res.id, used=used), ledger.commit(task_id, res.id, used=used)
        )
        assert first == again
    else:
        await ledger.commit(task_id, res.id, used=used)
    return Outcome(task_id, account, action, used)


async def evalsha_calls(ledger: Ledger) -> int:
    stats = await ledger.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_hundreds_of_coroutines_share_batches_and_keep_the_books(ledger: Ledger) -> None:
    for task_id in BATCH_TASKS:
        await ledger.open_task(task_id, BATCH_ACCOUNTS[ROOT])
        for path, budget in BATCH_ACCOUNTS.items():
            if path != ROOT:
                await ledger.open_account(task_id, path, budget)
    calls_before = await evalsha_calls(ledger)

    outcomes = await asyncio.gather(*(one_call(ledger, n) for n in range(CALLS)))

    script_calls = await evalsha_calls(ledger) - calls_before
    settled = [o for o in outcomes if o.action != "refused"]
    operations = CALLS + len(settled) + sum(o.action == "commit twice" for o in settled)
    # Operations in flight together went out together, not one script call each.
    assert script_calls * 4 < operations
    # root/a/x fits 20 holds, and the calls for it far outnumber that.
    assert any(o.action == "refused" for o in outcomes)
    for task_id in BATCH_TASKS:
        tree = await ledger.snapshot(task_id)
        assert_sound(tree)
        events = Counter(e.op for e in await ledger.events(task_id))
        mine = [o for o in settled if o.task_id == task_id]
        assert events["reserve"] == len(mine)
        assert events["release"] == sum(o.action == "release" for o in mine)
        assert events["commit"] == sum(o.action != "release" for o in mine)
        for path in BATCH_ACCOUNTS:
            acct = tree.account(path)
            here = [o for o in mine if o.account == path]
            assert acct.spent_tokens == sum(o.used.tokens for o in here), path
            assert acct.spent_nanos == sum(o.used.nanos for o in here), path
            assert acct.estimated_commits == sum(o.action == "estimate" for o in here), path


async def test_concurrent_reaps_count_each_expired_reservation_once(ledger: Ledger) -> None:
    """Two reapers at once release three expired holds: together they report three.

    Fails today: both reap operations land in one batch, and ``OPS['reap']`` in
    ``budgets/lua/reap.lua`` adds ``SWEPT`` (what the batch's opening sweep
    released) to each reply, so each reports all three.
    """
    await ledger.open_task("reap", Budget(tokens=100, usd="1"))
    for _ in range(3):
        await ledger.reserve("reap", ROOT, tokens=1, nanos=1, lease_s=0.01)
    await asyncio.sleep(0.05)
    counts = await asyncio.gather(ledger.reap("reap"), ledger.reap("reap"))
    assert (await ledger.snapshot("reap")).root.open_reservations == 0
    assert sum(counts) == 3, counts
