"""What batching changes on the wire and in the audit stream, and what it must not.

Operations in flight together travel as one script call, each packed in one
argument; their events share one stream entry, and ``Ledger.events`` gives them
back one by one, in order, resumable from any of them.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from budgets import Amount, Budget, Ledger
from budgets.connection import clustered
from budgets.errors import InvalidAmount
from budgets.keys import TaskKeys

pytestmark = pytest.mark.both_redis

T = "batch"


async def test_one_calls_events_share_an_entry_and_come_back_one_by_one(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=10_000, usd="1"))
    holds = await asyncio.gather(
        *(ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id=f"r{i}") for i in range(20))
    )
    await asyncio.gather(*(ledger.commit(T, h.id, used=Amount(tokens=5, nanos=5)) for h in holds))
    entries = await ledger.redis.xlen(TaskKeys(T).events)
    events = await ledger.events(T)
    assert [e.op for e in events] == ["open"] + ["reserve"] * 20 + ["commit"] * 20
    assert [e.op_id for e in events[1:21]] == [f"r{i}" for i in range(20)]
    assert all(e.tokens == 5 and e.tags == {} for e in events[21:])
    assert entries < len(events), "the batches' events were packed"
    assert len({e.id for e in events}) == len(events)
    # Resuming after any event, packed or not, gives exactly the rest.
    for cut in (0, 1, 5, 20, 21, 39):
        rest = await ledger.events(T, after=events[cut].id)
        assert [e.id for e in rest] == [e.id for e in events[cut + 1 :]]
        assert [e.id for e in await ledger.events(T, after=events[cut].id, count=3)] == [
            e.id for e in events[cut + 1 : cut + 4]
        ]
    assert all(e.ts_ms > 0 for e in events)


async def test_a_separator_in_kept_text_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=100, usd="1"))
    hold = await ledger.reserve(T, "root", tokens=10, nanos=10)
    before = (await ledger.account(T, "root"), len(await ledger.events(T)))
    for bad in ("a\x1fb", "a\x1eb"):
        with pytest.raises(InvalidAmount) as err:
            await ledger.commit(T, hold.id, used=Amount(tokens=1, nanos=1), keep=("w.1", bad))
        assert err.value.field == "keep"
    assert (await ledger.account(T, "root"), len(await ledger.events(T))) == before
    assert await ledger.kept(T, "w.1") is None


async def test_free_text_with_a_separator_is_kept_readable(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=100, usd="1"))
    hold = await ledger.reserve(T, "root", tokens=10, nanos=10)
    await ledger.release(T, hold.id, reason="cut\x1foff\x1ehere")
    released = [e for e in await ledger.events(T) if e.op == "release"]
    assert released[0].extra["reason"] == "cut off here"


async def test_a_batch_mixing_every_kind_of_operation_keeps_the_books(ledger: Ledger) -> None:
    # One batch: hot operations on copies of the accounts, other operations on Redis
    # itself; each must see what the ones before it did.
    await ledger.open_task(T, Budget.from_nanos(tokens=1_000, nanos=10_000))
    await ledger.open_account(T, "root/a", Budget.from_nanos(tokens=100, nanos=1_000))
    first = await ledger.reserve(T, "root/a", tokens=60, nanos=600)
    outcome = await asyncio.gather(
        ledger.commit(T, first.id, used=Amount(tokens=10, nanos=100)),
        ledger.reserve(T, "root/a", tokens=80, nanos=800, reservation_id="second"),
        ledger.transfer(T, src="root", dst="root/a", amount=Amount(tokens=50, nanos=500)),
        ledger.reserve(T, "root/a", tokens=55, nanos=550, reservation_id="third"),
        ledger.release(T, "second"),
        ledger.open_account(T, "root/b", Budget.from_nanos(tokens=10, nanos=100)),
        return_exceptions=True,
    )
    assert not [o for o in outcome if isinstance(o, BaseException)], outcome
    a = await ledger.account(T, "root/a")
    # 150 limit after the transfer; 10 spent; "third" holds 55.
    assert (a.limit_tokens, a.spent_tokens, a.reserved_tokens, a.open_reservations) == (
        150,
        10,
        55,
        1,
    )
    root = await ledger.account(T, "root")
    assert (root.carved_tokens, root.carved_nanos) == (160, 1_600)
    entries = await ledger.redis.xlen(TaskKeys(T).events)
    assert [e.op for e in (await ledger.events(T))[3:]] == [
        "commit",
        "reserve",
        "transfer",
        "reserve",
        "release",
        "open",
    ]
    assert entries < 3 + 6


@pytest.mark.parametrize("functions", [True, False])
async def test_a_flushed_server_gets_the_scripts_again(redis_url: str, functions: bool) -> None:
    # With functions the task script is FCALLed, else EVALSHAed; either way a flushed
    # server is loaded again and the operation goes through.
    ledger = Ledger.from_url(redis_url)
    if not functions:
        ledger = Ledger(ledger.redis, url=redis_url, functions=False)
    try:
        await ledger.open_task(T, Budget(tokens=100, usd="1"))
        await ledger.redis.function_flush()
        await ledger.redis.script_flush()
        await ledger.redis.config_resetstat()
        hold = await ledger.reserve(T, "root", tokens=10, nanos=10)
        await ledger.commit(T, hold.id, used=Amount(tokens=4, nanos=4))
        if not clustered(ledger.redis):  # a cluster always EVALSHAs (see ScriptRunner)
            stats = await ledger.redis.info("commandstats")
            assert ("cmdstat_fcall" in stats) is functions
            assert ("cmdstat_evalsha" in stats) is not functions
        assert (await ledger.account(T, "root")).spent_tokens == 4
    finally:
        await ledger.aclose()


async def test_a_cancelled_operation_leaves_those_sent_after_it_unharmed(
    ledger: Ledger, redis_url: str, redis_kind: str, request: pytest.FixtureRequest
) -> None:
    # A lone operation goes out from its caller's task; operations arriving while it is
    # on the wire wait for it. Cancelling it (its reply never read) must not fail them,
    # nor stop later ones: they go on a connection opened afresh.
    await ledger.open_task(T, Budget(tokens=1_000, usd="1"))
    warm = await ledger.reserve(T, "root", tokens=1, nanos=1)  # scripts loaded, line open
    pausers = [redis.asyncio.Redis(port=port) for port in _ports(redis_url, redis_kind, request)]
    for p in pausers:
        await p.client_pause(400, all=False)  # writes wait 0.4 s: the script call hangs
    lone = asyncio.create_task(
        ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id="lone")
    )
    await asyncio.sleep(0.05)
    queued = [
        asyncio.create_task(ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id=f"q{i}"))
        for i in range(8)
    ]
    await asyncio.sleep(0.05)
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    holds = await asyncio.wait_for(asyncio.gather(*queued), timeout=10)
    assert sorted(h.id for h in holds) == [f"q{i}" for i in range(8)]
    assert (await ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id="later")).id
    for p in pausers:
        await p.aclose()
    root = (await ledger.snapshot(T)).root
    held = {r.id for r in root.reservations}
    # The cancelled call may have run (it was sent) or not; nothing else is missing or extra.
    expected = {warm.id, "later", *(f"q{i}" for i in range(8))}
    assert held - {"lone"} == expected
    assert root.reserved_tokens == 1 + 10 * (len(held) - 1)


def _ports(redis_url: str, redis_kind: str, request: pytest.FixtureRequest) -> list[int]:
    """The ports of the server, or of every master of the cluster."""
    if redis_kind == "cluster":
        return [node.port for node in request.getfixturevalue("redis_cluster").masters()]
    return [int(redis_url.rsplit(":", 1)[1].split("/")[0])]


async def _script_calls(ports: list[int]) -> int:
    """Task-script calls (FCALL or EVALSHA) the servers on ``ports`` ran since their reset."""
    total = 0
    for port in ports:
        node = redis.asyncio.Redis(port=port)
        stats = await node.info("commandstats")
        await node.aclose()
        total += sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("fcall", "evalsha"))
    return total


async def _wake_several(ledger: Ledger) -> list[str]:
    """Three reserves at once: the first goes alone, the two behind it in one batch,
    whose replies wake two callers (so the next batch waits a turn of the loop)."""
    ids = ["p0", "p1", "p2"]
    await asyncio.gather(
        *(ledger.reserve(T, "root", tokens=1, nanos=1, reservation_id=i) for i in ids)
    )
    return ids


async def test_callers_woken_together_send_their_next_operations_in_one_call(
    ledger: Ledger, redis_url: str, redis_kind: str, request: pytest.FixtureRequest
) -> None:
    # Sixteen callers each reserve, then commit. The first reserve finds nothing on
    # the wire and goes at once; the other fifteen (and the first's commit) go in the
    # batch behind it. That batch's replies wake fifteen callers at once: the first of
    # them to commit waits one turn of the loop, and the other fourteen commits join
    # it, instead of it going alone with them behind it.
    await ledger.open_task(T, Budget(tokens=1_000, usd="1"))
    await ledger.reserve(T, "root", tokens=1, nanos=1)  # scripts loaded, line open
    ports = _ports(redis_url, redis_kind, request)
    for port in ports:
        node = redis.asyncio.Redis(port=port)
        await node.config_resetstat()
        await node.aclose()

    async def call(i: int) -> str:
        hold = await ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id=f"g{i}")
        await ledger.commit(T, hold.id, used=Amount(tokens=4, nanos=4))
        return hold.id

    assert await asyncio.gather(*(call(i) for i in range(16))) == [f"g{i}" for i in range(16)]
    assert await _script_calls(ports) == 3
    # One after another, each goes at once, in a call of its own.
    for i in range(3):
        await ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id=f"s{i}")
    assert await _script_calls(ports) == 6
    a = await ledger.account(T, "root")
    assert (a.spent_tokens, a.reserved_tokens) == (4 * 16, 1 + 10 * 3)


async def test_a_cancelled_caller_leaves_the_operations_it_carried_unharmed(
    ledger: Ledger, redis_url: str, redis_kind: str, request: pytest.FixtureRequest
) -> None:
    # The first of operations issued together after a batch woke several callers sends
    # them all from its own task. Cancel it while they are on the wire (their replies
    # never read): the others still get their replies (sent again: each operation is
    # idempotent) and hold once.
    await ledger.open_task(T, Budget(tokens=1_000, usd="1"))
    before = await _wake_several(ledger)
    pausers = [redis.asyncio.Redis(port=port) for port in _ports(redis_url, redis_kind, request)]
    for p in pausers:
        await p.client_pause(400, all=False)  # writes wait 0.4 s: the script call hangs
    calls = [
        asyncio.create_task(ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id=f"c{i}"))
        for i in range(8)
    ]
    await asyncio.sleep(0.05)  # c0 leads: all eight are on the wire in its batch
    calls[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await calls[0]
    holds = await asyncio.wait_for(asyncio.gather(*calls[1:]), timeout=10)
    assert [h.id for h in holds] == [f"c{i}" for i in range(1, 8)]
    for p in pausers:
        await p.aclose()
    root = (await ledger.snapshot(T)).root
    held = {r.id for r in root.reservations}
    # The cancelled call was sent, and may have run; nothing else is missing or extra.
    assert held - {"c0"} == {*before, *(f"c{i}" for i in range(1, 8))}
    assert root.reserved_tokens == 3 + 10 * (len(held) - 3)
    reserved = [e.op_id for e in await ledger.events(T) if e.op == "reserve"]
    assert sorted(reserved) == sorted(held), "each reservation was made once"


async def test_a_caller_cancelled_before_its_batch_goes_takes_only_its_own_operation(
    ledger: Ledger,
) -> None:
    await ledger.open_task(T, Budget(tokens=1_000, usd="1"))
    before = await _wake_several(ledger)
    calls = [
        asyncio.create_task(ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id=f"w{i}"))
        for i in range(4)
    ]
    await asyncio.sleep(0)  # w0 waits its turn of the loop to send; w1..w3 joined it
    calls[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await calls[0]
    holds = await asyncio.wait_for(asyncio.gather(*calls[1:]), timeout=10)
    assert [h.id for h in holds] == ["w1", "w2", "w3"]
    root = (await ledger.snapshot(T)).root
    assert {r.id for r in root.reservations} == {*before, "w1", "w2", "w3"}, "w0 never went"
    assert root.reserved_tokens == 3 + 30
