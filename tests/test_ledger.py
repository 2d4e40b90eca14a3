"""Each ledger operation against a real redis-server: effect, idempotency, refusals, bad input."""

from __future__ import annotations

import asyncio

import pytest

from budgets import Amount, Budget, BudgetExceeded, Ledger, LedgerUnavailable, TaskTree
from budgets.connection import redis_client
from budgets.errors import (
    AccountBusy,
    AccountClosed,
    AccountExists,
    InvalidAmount,
    InvalidName,
    InvalidTransfer,
    OperationConflict,
    ReservationSettled,
    TaskExists,
    UnknownAccount,
    UnknownReservation,
    UnknownTask,
    UnknownTenant,
    UnlimitedChild,
)
from budgets.keys import OPEN_TASKS, TaskKeys

pytestmark = pytest.mark.both_redis

T = "task-1"


async def state(ledger: Ledger, task_id: str = T) -> str:
    """Everything the ledger holds for a task except the audit stream, as text."""
    tree = await ledger.snapshot(task_id)
    return tree.model_dump_json()


async def opened(ledger: Ledger, *, tokens: int = 1000, usd: str = "1") -> TaskTree:
    await ledger.open_task(T, Budget(tokens=tokens, usd=usd))
    return await ledger.snapshot(T)


# -- open ---------------------------------------------------------------------


async def test_open_task_creates_root_with_limits(ledger: Ledger) -> None:
    tree = await opened(ledger, tokens=1000, usd="0.25")
    assert tree.root.limit_tokens == 1000
    assert tree.root.limit_nanos == 250_000_000
    assert tree.root.available_tokens == 1000
    assert tree.status == "open"
    assert T in await ledger.redis.smembers(OPEN_TASKS)


async def test_open_task_twice_is_refused_unless_same_op_id(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=10), op_id="op-1")
    await ledger.open_task(T, Budget(tokens=10), op_id="op-1")  # retry: fine
    before = await state(ledger)
    with pytest.raises(TaskExists):
        await ledger.open_task(T, Budget(tokens=99), op_id="op-2")
    with pytest.raises(OperationConflict):
        await ledger.open_task(T, Budget(tokens=99), op_id="op-1")
    assert await state(ledger) == before


async def test_open_child_carves_from_parent(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    left = await ledger.open_account(T, "root/a", Budget(tokens=300, usd="0.4"))
    assert left == Budget(tokens=700, usd="0.6")
    tree = await ledger.snapshot(T)
    assert tree.root.carved_tokens == 300
    assert tree.root.carved_nanos == 400_000_000
    assert tree.account("root/a").limit_tokens == 300
    assert tree.root.open_children == 1


async def test_open_child_larger_than_parent_is_refused_and_changes_nothing(
    ledger: Ledger,
) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=600, usd="0.1"))
    before = await state(ledger)
    with pytest.raises(BudgetExceeded) as err:
        await ledger.open_account(T, "root/b", Budget(tokens=401, usd="0.1"))
    assert (err.value.unit, err.value.requested, err.value.available) == ("tokens", 401, 400)
    assert err.value.account == "root"
    assert await state(ledger) == before


async def test_unlimited_child_under_limited_parent_is_refused(ledger: Ledger) -> None:
    await opened(ledger)
    before = await state(ledger)
    with pytest.raises(UnlimitedChild, match="tokens"):
        await ledger.open_account(T, "root/a", Budget(usd="0.1"))
    assert await state(ledger) == before


async def test_unlimited_parent_may_have_limited_and_unlimited_children(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(usd="1"))  # tokens unlimited
    await ledger.open_account(T, "root/a", Budget(tokens=50, usd="0.5"))
    await ledger.open_account(T, "root/b", Budget(usd="0.5"))
    tree = await ledger.snapshot(T)
    assert tree.account("root/b").limit_tokens is None
    assert tree.account("root/a").available_tokens == 50
    assert tree.root.available_nanos == 0


async def test_open_account_errors(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.open_account(T, "root/a", Budget(tokens=10, usd="0"))
    before = await state(ledger)
    with pytest.raises(AccountExists):
        await ledger.open_account(T, "root/a", Budget(tokens=5, usd="0"), op_id="other")
    with pytest.raises(UnknownAccount):
        await ledger.open_account(T, "root/nope/x", Budget(tokens=1, usd="0"))
    with pytest.raises(UnknownTask):
        await ledger.open_account("no-such-task", "root/a", Budget(tokens=1, usd="0"))
    with pytest.raises(InvalidName):
        await ledger.open_account(T, "notroot/a", Budget(tokens=1, usd="0"))
    with pytest.raises(InvalidName):
        await ledger.open_account(T, "root/{evil}", Budget(tokens=1, usd="0"))
    for bad in ["root/a\n", "root/", "root//a", "root/" + "a" * 65, "/".join(["root"] * 9)]:
        with pytest.raises(InvalidName):  # a trailing newline too: the whole path must match
            await ledger.open_account(T, bad, Budget(tokens=1, usd="0"))
    assert await state(ledger) == before


async def test_carve_opens_as_open_account_does_from_the_ledgers_integers(
    ledger: Ledger,
) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.carve(T, "root/a", tokens=300, nanos=250_000_000)
    await ledger.open_account(T, "root/b", Budget.from_nanos(tokens=300, nanos=250_000_000))
    tree = await ledger.snapshot(T)
    a, b = tree.account("root/a"), tree.account("root/b")
    assert (a.limit_tokens, a.limit_nanos) == (b.limit_tokens, b.limit_nanos) == (300, 250_000_000)
    assert tree.root.available_tokens == 400
    before = await state(ledger)
    with pytest.raises(BudgetExceeded):
        await ledger.carve(T, "root/c", tokens=401, nanos=0)
    with pytest.raises(UnlimitedChild):
        await ledger.carve(T, "root/c", tokens=None, nanos=0)
    with pytest.raises(InvalidAmount):
        await ledger.carve(T, "root/c", tokens=-1, nanos=0)
    assert await state(ledger) == before


@pytest.mark.parametrize("bad", ["", "a b", "{x}", "x" * 200, "-lead", "task\n", None, 5])
async def test_bad_task_ids_are_refused(ledger: Ledger, bad: object) -> None:
    with pytest.raises(InvalidName):
        await ledger.open_task(bad, Budget(tokens=1))  # type: ignore[arg-type]
    assert await ledger.redis.dbsize() == 0


# -- reserve, commit, release -------------------------------------------------------


async def test_reserve_holds_and_commit_settles_actual_usage(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    res = await ledger.reserve(T, "root", tokens=400, nanos=4000, tags={"endpoint": "e1"})
    tree = await ledger.snapshot(T)
    assert tree.root.reserved_tokens == 400
    assert tree.root.available_tokens == 600
    assert [r.id for r in tree.root.reservations] == [res.id]
    assert tree.root.reservations[0].tags == {"endpoint": "e1"}

    done = await ledger.commit(T, res.id, used=Amount(tokens=150, nanos=1500))
    assert (done.tokens, done.nanos, done.late, done.estimated) == (150, 1500, False, False)
    tree = await ledger.snapshot(T)
    assert tree.root.reserved_tokens == 0
    assert tree.root.spent_tokens == 150
    assert tree.root.spent_nanos == 1500
    assert tree.root.available_tokens == 850  # the unused 250 came back
    assert tree.root.reservations == []


async def test_reserve_beyond_available_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    await opened(ledger, tokens=100, usd="0.000001")  # 1000 nanos
    before = await state(ledger)
    with pytest.raises(BudgetExceeded) as err:
        await ledger.reserve(T, "root", tokens=101, nanos=1)
    assert err.value.unit == "tokens"
    with pytest.raises(BudgetExceeded) as err:
        await ledger.reserve(T, "root", tokens=1, nanos=1001)
    assert (err.value.unit, err.value.requested, err.value.available) == ("nanos", 1001, 1000)
    assert await state(ledger) == before


async def test_reserve_exactly_what_is_available_succeeds(ledger: Ledger) -> None:
    await opened(ledger, tokens=100, usd="0.000001")
    await ledger.reserve(T, "root", tokens=100, nanos=1000)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(T, "root", tokens=1, nanos=0)


async def test_reserve_is_idempotent_by_reservation_id(ledger: Ledger) -> None:
    await opened(ledger)
    first = await ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id="r1")
    snap = await state(ledger)
    again = await ledger.reserve(T, "root", tokens=10, nanos=10, reservation_id="r1")
    assert again == first
    assert await state(ledger) == snap
    with pytest.raises(OperationConflict):
        await ledger.reserve(T, "root", tokens=11, nanos=10, reservation_id="r1")
    assert await state(ledger) == snap


async def test_commit_is_idempotent(ledger: Ledger) -> None:
    await opened(ledger)
    res = await ledger.reserve(T, "root", tokens=10, nanos=10)
    first = await ledger.commit(T, res.id, used=Amount(tokens=5, nanos=5))
    snap = await state(ledger)
    events = len(await ledger.events(T))
    assert await ledger.commit(T, res.id, used=Amount(tokens=5, nanos=5)) == first
    assert await state(ledger) == snap
    assert len(await ledger.events(T)) == events
    with pytest.raises(OperationConflict):
        await ledger.commit(T, res.id, used=Amount(tokens=6, nanos=5))


async def test_commit_above_reservation_records_an_overrun(ledger: Ledger) -> None:
    await opened(ledger, tokens=100, usd="1")
    res = await ledger.reserve(T, "root", tokens=80, nanos=10)
    done = await ledger.commit(T, res.id, used=Amount(tokens=130, nanos=10))
    assert (done.tokens, done.overrun_tokens, done.overrun_nanos) == (130, 30, 0)
    tree = await ledger.snapshot(T)
    assert tree.root.spent_tokens == 130
    assert tree.root.overrun_tokens == 30
    assert tree.root.available_tokens == 0
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(T, "root", tokens=1, nanos=0)
    ops = [e.op for e in await ledger.events(T)]
    assert ops[-2:] == ["commit", "overrun"]


async def test_commit_above_reservation_within_room_is_no_overrun(ledger: Ledger) -> None:
    await opened(ledger, tokens=100, usd="1")
    res = await ledger.reserve(T, "root", tokens=10, nanos=10)
    done = await ledger.commit(T, res.id, used=Amount(tokens=60, nanos=10))
    assert done.overrun_tokens == 0
    assert (await ledger.snapshot(T)).root.available_tokens == 40


async def test_commit_without_usage_charges_the_reservation_flagged(ledger: Ledger) -> None:
    await opened(ledger)
    res = await ledger.reserve(T, "root", tokens=70, nanos=700)
    done = await ledger.commit(T, res.id, used=None)
    assert (done.tokens, done.nanos, done.estimated) == (70, 700, True)
    tree = await ledger.snapshot(T)
    assert tree.root.spent_tokens == 70
    assert tree.root.estimated_commits == 1
    commit = next(e for e in await ledger.events(T) if e.op == "commit")
    assert commit.extra.get("estimated") == "1"


async def test_release_returns_the_hold(ledger: Ledger) -> None:
    await opened(ledger, tokens=100)
    res = await ledger.reserve(T, "root", tokens=100, nanos=0)
    assert await ledger.release(T, res.id, reason="call failed") is False
    tree = await ledger.snapshot(T)
    assert (tree.root.reserved_tokens, tree.root.spent_tokens) == (0, 0)
    assert tree.root.available_tokens == 100
    snap = await state(ledger)
    assert await ledger.release(T, res.id) is False  # retry: same answer, no change
    assert await state(ledger) == snap


async def test_settling_twice_different_ways_is_refused(ledger: Ledger) -> None:
    await opened(ledger)
    a = await ledger.reserve(T, "root", tokens=1, nanos=1)
    await ledger.commit(T, a.id, used=Amount(tokens=1, nanos=1))
    with pytest.raises(ReservationSettled, match="committed"):
        await ledger.release(T, a.id)
    b = await ledger.reserve(T, "root", tokens=1, nanos=1)
    await ledger.release(T, b.id)
    snap = await state(ledger)
    with pytest.raises(ReservationSettled, match="released"):
        await ledger.commit(T, b.id, used=Amount(tokens=1, nanos=1))
    assert await state(ledger) == snap


async def test_unknown_reservation(ledger: Ledger) -> None:
    await opened(ledger)
    snap = await state(ledger)
    with pytest.raises(UnknownReservation):
        await ledger.commit(T, "nope", used=Amount(tokens=1))
    with pytest.raises(UnknownReservation):
        await ledger.release(T, "nope")
    assert await state(ledger) == snap


async def test_reserve_bad_input_changes_nothing(ledger: Ledger) -> None:
    await opened(ledger)
    snap = await state(ledger)
    with pytest.raises(InvalidAmount):
        await ledger.reserve(T, "root", tokens=-1, nanos=0)
    with pytest.raises(InvalidAmount):
        await ledger.reserve(T, "root", tokens=1, nanos=2**60)
    with pytest.raises(InvalidAmount):
        await ledger.reserve(T, "root", tokens=1, nanos=1, lease_s=0)
    with pytest.raises(UnknownAccount):
        await ledger.reserve(T, "root/missing", tokens=1, nanos=1)
    with pytest.raises(InvalidName):
        await ledger.reserve(T, "root", tokens=1, nanos=1, reservation_id="bad id")
    assert await state(ledger) == snap


# -- leases ---------------------------------------------------------------------


async def test_expired_lease_is_released_by_the_next_operation(ledger: Ledger) -> None:
    await opened(ledger, tokens=100)
    await ledger.reserve(T, "root", tokens=100, nanos=0, lease_s=0.05)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(T, "root", tokens=1, nanos=0)
    await asyncio.sleep(0.1)
    # The hold ran out: the next reservation on the task sweeps it first.
    await ledger.reserve(T, "root", tokens=100, nanos=0)
    ops = [e.op for e in await ledger.events(T)]
    assert "expire" in ops


async def test_reap_releases_expired_reservations(ledger: Ledger) -> None:
    await opened(ledger, tokens=100)
    for _ in range(5):
        await ledger.reserve(T, "root", tokens=10, nanos=0, lease_s=0.05)
    await ledger.reserve(T, "root", tokens=10, nanos=0, lease_s=60)
    await asyncio.sleep(0.1)
    assert await ledger.reap_all() == 5
    tree = await ledger.snapshot(T)
    assert tree.root.reserved_tokens == 10
    assert tree.root.open_reservations == 1
    assert await ledger.reap(T) == 0


async def test_commit_after_lease_expired_is_recorded_late(ledger: Ledger) -> None:
    await opened(ledger, tokens=100)
    res = await ledger.reserve(T, "root", tokens=40, nanos=0, lease_s=0.05)
    await asyncio.sleep(0.1)
    assert await ledger.reap(T) == 1
    done = await ledger.commit(T, res.id, used=Amount(tokens=30, nanos=0))
    assert done.late
    tree = await ledger.snapshot(T)
    assert (tree.root.spent_tokens, tree.root.reserved_tokens) == (30, 0)
    assert tree.root.late_commits == 1
    # A release after expiry reports it and changes nothing.
    other = await ledger.reserve(T, "root", tokens=1, nanos=0, lease_s=0.05)
    await asyncio.sleep(0.1)
    await ledger.reap(T)
    assert await ledger.release(T, other.id) is True


# -- transfer --------------------------------------------------------------------


async def test_transfer_down_up_and_across(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    await ledger.open_account(T, "root/b", Budget(tokens=100, usd="0.1"))

    await ledger.transfer(T, src="root", dst="root/a", amount=Amount(tokens=50, nanos=0))
    tree = await ledger.snapshot(T)
    assert tree.account("root/a").limit_tokens == 150
    assert tree.root.carved_tokens == 250

    await ledger.transfer(T, src="root/a", dst="root", amount=Amount(tokens=20, nanos=1))
    tree = await ledger.snapshot(T)
    assert tree.account("root/a").limit_tokens == 130
    assert tree.account("root/a").limit_nanos == 100_000_000 - 1
    assert tree.root.carved_tokens == 230

    await ledger.transfer(T, src="root/a", dst="root/b", amount=Amount(tokens=30, nanos=0))
    tree = await ledger.snapshot(T)
    assert tree.account("root/a").limit_tokens == 100
    assert tree.account("root/b").limit_tokens == 130
    assert tree.root.carved_tokens == 230  # across leaves the parent's carve unchanged


async def test_transfer_never_takes_what_is_spent_or_reserved(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    res = await ledger.reserve(T, "root/a", tokens=60, nanos=0)
    await ledger.commit(T, res.id, used=Amount(tokens=30, nanos=0))
    await ledger.reserve(T, "root/a", tokens=20, nanos=0)
    snap = await state(ledger)
    with pytest.raises(BudgetExceeded) as err:
        await ledger.transfer(T, src="root/a", dst="root", amount=Amount(tokens=51, nanos=0))
    assert err.value.available == 50
    assert await state(ledger) == snap
    await ledger.transfer(T, src="root/a", dst="root", amount=Amount(tokens=50, nanos=0))
    assert (await ledger.snapshot(T)).account("root/a").available_tokens == 0


async def test_transfer_of_everything_moves_what_the_source_has_in_one_step(
    ledger: Ledger,
) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    res = await ledger.reserve(T, "root/a", tokens=60, nanos=5)
    await ledger.commit(T, res.id, used=Amount(tokens=30, nanos=5))
    await ledger.reserve(T, "root/a", tokens=20, nanos=0)
    src, dst = await ledger.transfer(T, src="root/a", dst="root", amount=None, op_id="all1")
    tree = await ledger.snapshot(T)
    assert tree.account("root/a").available_tokens == src.tokens == 0
    assert tree.account("root/a").available_nanos == 0
    assert tree.root.available_tokens == dst.tokens == 900 + 50
    assert tree.root.available_nanos == 900_000_000 + 100_000_000 - 5
    moved = [e for e in await ledger.events(T) if e.op == "transfer"]
    assert [(e.tokens, e.nanos) for e in moved] == [(50, 100_000_000 - 5)]
    # A repeat answers as the first; nothing left to move writes nothing.
    snap = await state(ledger)
    assert await ledger.transfer(T, src="root/a", dst="root", amount=None, op_id="all1") == (
        src,
        dst,
    )
    await ledger.transfer(T, src="root/a", dst="root", amount=None, op_id="all2")
    assert await state(ledger) == snap
    assert len([e for e in await ledger.events(T) if e.op == "transfer"]) == 1


async def test_transfer_refusals_change_nothing(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    await ledger.open_account(T, "root/a/x", Budget(tokens=10, usd="0.01"))
    await ledger.open_account(T, "root/b", Budget(tokens=100, usd="0.1"))
    snap = await state(ledger)
    with pytest.raises(InvalidTransfer):  # cousins
        await ledger.transfer(T, src="root/a/x", dst="root/b", amount=Amount(tokens=1))
    with pytest.raises(InvalidTransfer):  # grandparent
        await ledger.transfer(T, src="root", dst="root/a/x", amount=Amount(tokens=1))
    with pytest.raises(InvalidAmount):
        await ledger.transfer(T, src="root", dst="root/a", amount=Amount())
    with pytest.raises(BudgetExceeded):
        await ledger.transfer(T, src="root", dst="root/a", amount=Amount(tokens=801))
    with pytest.raises(UnknownAccount):
        await ledger.transfer(T, src="root", dst="root/zz", amount=Amount(tokens=1))
    assert await state(ledger) == snap


async def test_transfer_idempotent_by_op_id(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    amount = Amount(tokens=5, nanos=0)
    await ledger.transfer(T, src="root", dst="root/a", amount=amount, op_id="tx1")
    await ledger.transfer(T, src="root", dst="root/a", amount=amount, op_id="tx1")
    assert (await ledger.snapshot(T)).account("root/a").limit_tokens == 105


# -- close ---------------------------------------------------------------------------


async def test_close_returns_unspent_to_parent(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=300, usd="0.3"))
    res = await ledger.reserve(T, "root/a", tokens=200, nanos=2000)
    await ledger.commit(T, res.id, used=Amount(tokens=120, nanos=1200))
    closed = await ledger.close_account(T, "root/a")
    assert (closed.returned_tokens, closed.spent_tokens) == (180, 120)
    assert closed.returned_nanos == 300_000_000 - 1200
    tree = await ledger.snapshot(T)
    assert tree.root.available_tokens == 880
    assert tree.root.carved_tokens == 0
    assert tree.root.closed_children_spent_tokens == 120
    assert tree.root.total_spent_tokens == 120
    assert tree.account("root/a").closed
    # Closing again returns the first answer and changes nothing.
    snap = await state(ledger)
    assert await ledger.close_account(T, "root/a") == closed
    assert await state(ledger) == snap


async def test_close_saves_a_result_in_the_same_step(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    await ledger.open_account(T, "root/a/x", Budget(tokens=10, usd="0.01"))
    results = TaskKeys(T).results
    # Refused (an open child): nothing is saved, as nothing is closed.
    with pytest.raises(AccountBusy):
        await ledger.close_account(T, "root/a", result=("a", '{"text": "A"}'))
    assert await ledger.redis.hgetall(results) == {}
    closed = await ledger.close_account(T, "root/a/x", result=("a:x", '{"text": "X"}'))
    assert await ledger.redis.hgetall(results) == {"a:x": '{"text": "X"}'}
    # A repeat (a batch sent again after a lost reply) answers as the first and saves too.
    await ledger.redis.hdel(results, "a:x")
    assert await ledger.close_account(T, "root/a/x", result=("a:x", '{"text": "X"}')) == closed
    assert await ledger.redis.hget(results, "a:x") == '{"text": "X"}'
    with pytest.raises(InvalidAmount):
        await ledger.close_account(T, "root/a", result=("a", "no \x1f in it"))
    with pytest.raises(InvalidName):
        await ledger.close_account(T, "root/a", result=("a b", "{}"))
    assert not (await ledger.account(T, "root/a")).closed


async def test_closed_account_takes_no_reservations(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.open_account(T, "root/a", Budget(tokens=10, usd="0.1"))
    await ledger.close_account(T, "root/a")
    with pytest.raises(AccountClosed):
        await ledger.reserve(T, "root/a", tokens=1, nanos=0)
    with pytest.raises(AccountClosed):
        await ledger.transfer(T, src="root", dst="root/a", amount=Amount(tokens=1))


async def test_close_refused_while_busy_unless_forced(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    await ledger.open_account(T, "root/a/x", Budget(tokens=10, usd="0.01"))
    res = await ledger.reserve(T, "root/a", tokens=50, nanos=0)
    snap = await state(ledger)
    with pytest.raises(AccountBusy) as err:
        await ledger.close_account(T, "root/a")
    assert (err.value.children, err.value.reservations) == (1, 1)
    await ledger.close_account(T, "root/a/x")
    with pytest.raises(AccountBusy):
        await ledger.close_account(T, "root/a")
    assert snap != await state(ledger)  # x closed
    closed = await ledger.close_account(T, "root/a", force=True)
    assert closed.returned_tokens == 100
    # The call that was in flight still reports: charged late, up the tree.
    done = await ledger.commit(T, res.id, used=Amount(tokens=40, nanos=0))
    assert done.late
    assert done.overrun_tokens == 40
    tree = await ledger.snapshot(T)
    assert tree.root.total_spent_tokens == 40
    assert tree.root.closed_children_spent_tokens == 40
    assert tree.root.available_tokens == 1000 - 40


async def test_close_task_closes_everything_and_is_repeatable(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=100, usd="0.1"))
    await ledger.open_account(T, "root/a/x", Budget(tokens=10, usd="0.01"))
    await ledger.open_account(T, "root/b", Budget(tokens=100, usd="0.1"))
    res = await ledger.reserve(T, "root/a/x", tokens=10, nanos=10)
    await ledger.commit(T, res.id, used=Amount(tokens=7, nanos=7))
    closed = await ledger.close_task(T)
    assert (closed.spent_tokens, closed.returned_tokens) == (7, 993)
    tree = await ledger.snapshot(T)
    assert all(a.closed for a in tree.walk())
    assert tree.status == "closed"
    assert T not in await ledger.redis.smembers(OPEN_TASKS)
    assert await ledger.close_task(T) == closed


# -- tenants ----------------------------------------------------------------------


async def test_tenant_funds_task_and_takes_back_leftover(ledger: Ledger) -> None:
    await ledger.set_tenant("acme", Budget(tokens=10_000, usd="1"), period="month")
    await ledger.open_task(T, Budget(tokens=4000, usd="0.4"), tenant="acme")
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.funded_nanos) == (4000, 400_000_000)
    assert len(view.period_id) == 7  # YYYY-MM
    res = await ledger.reserve(T, "root", tokens=1000, nanos=1000)
    await ledger.commit(T, res.id, used=Amount(tokens=600, nanos=600))
    await ledger.close_task(T)
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens, view.spent_nanos) == (0, 600, 600)
    # Settlement is idempotent.
    await ledger.close_task(T)
    assert (await ledger.tenant("acme")).spent_tokens == 600


async def test_tenant_that_cannot_fund_refuses_the_task(ledger: Ledger) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000, usd="1"), period="day")
    await ledger.open_task("t-a", Budget(tokens=800, usd="0.1"), tenant="acme")
    with pytest.raises(BudgetExceeded) as err:
        await ledger.open_task("t-b", Budget(tokens=201, usd="0.1"), tenant="acme")
    assert err.value.available == 200
    with pytest.raises(UnknownTask):
        await ledger.snapshot("t-b")
    assert (await ledger.tenant("acme")).funded_tokens == 800
    with pytest.raises(UnlimitedChild):
        await ledger.open_task("t-c", Budget(usd="0.1"), tenant="acme")


async def test_unknown_tenant_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownTenant):
        await ledger.open_task(T, Budget(tokens=1), tenant="nobody")
    with pytest.raises(UnknownTask):
        await ledger.snapshot(T)
    with pytest.raises(UnknownTenant):
        await ledger.tenant("nobody")


async def test_task_id_clash_under_tenant_gives_the_funding_back(ledger: Ledger) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000, usd="1"), period="none")
    await ledger.open_task(T, Budget(tokens=500, usd="0.5"), tenant="acme")
    with pytest.raises(TaskExists):
        await ledger.open_task(T, Budget(tokens=300, usd="0.3"), tenant="acme")
    view = await ledger.tenant("acme")
    assert view.funded_tokens == 500
    assert view.period_id == "all"
    assert await ledger.tenants() == ["acme"]


# -- reading and failure -----------------------------------------------------------


async def test_events_record_every_operation_with_tags(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.open_account(T, "root/a", Budget(tokens=10, usd="0.1"))
    res = await ledger.reserve(T, "root/a", tokens=5, nanos=5, tags={"model": "m", "endpoint": "e"})
    await ledger.commit(T, res.id, used=Amount(tokens=4, nanos=4))
    events = await ledger.events(T)
    assert [e.op for e in events] == ["open", "open", "reserve", "commit"]
    commit = events[-1]
    assert (commit.account, commit.tokens, commit.nanos, commit.op_id) == ("root/a", 4, 4, res.id)
    assert commit.tags == {"endpoint": "e", "model": "m"}
    assert commit.ts_ms > 0
    later = await ledger.events(T, after=events[1].id)
    assert [e.op for e in later] == ["reserve", "commit"]


async def test_snapshot_totals_roll_up_without_double_counting(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")
    await ledger.open_account(T, "root/a", Budget(tokens=500, usd="0.5"))
    await ledger.open_account(T, "root/a/x", Budget(tokens=100, usd="0.1"))
    for path, used in (("root", 1), ("root/a", 10), ("root/a/x", 100)):
        res = await ledger.reserve(T, path, tokens=used, nanos=used)
        await ledger.commit(T, res.id, used=Amount(tokens=used, nanos=used))
    await ledger.close_account(T, "root/a/x")  # closed children count once, not twice
    tree = await ledger.snapshot(T)
    assert tree.root.total_spent_tokens == 111
    assert tree.account("root/a").total_spent_tokens == 110
    dumped = TaskTree.model_validate_json(tree.model_dump_json())
    assert dumped.root.total_spent_nanos == 111


async def test_unknown_task_snapshot(ledger: Ledger) -> None:
    with pytest.raises(UnknownTask):
        await ledger.snapshot("missing")
    with pytest.raises(UnknownTask):
        await ledger.close_task("missing")


async def test_scripts_reload_after_redis_forgets_them(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.redis.script_flush()
    res = await ledger.reserve(T, "root", tokens=1, nanos=1)
    assert res.tokens == 1


async def test_unreachable_redis_names_the_url_without_password() -> None:
    from orchestrator.redis_server import free_port

    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    led = Ledger.from_url(url)
    try:
        with pytest.raises(LedgerUnavailable) as err:
            await led.open_task(T, Budget(tokens=1))
        assert "s3cret" not in str(err.value)
        assert "127.0.0.1" in str(err.value)
        with pytest.raises(LedgerUnavailable):
            await led.ping()
    finally:
        await led.aclose()


async def test_keys_share_the_task_hash_tag(ledger: Ledger) -> None:
    await opened(ledger)
    await ledger.open_account(T, "root/a", Budget(tokens=1, usd="0"))
    await ledger.reserve(T, "root/a", tokens=1, nanos=0)
    keys = [k async for k in ledger.redis.scan_iter(match="pm:{*")]
    assert keys
    assert all(k.startswith(TaskKeys(T).base) for k in keys)


async def test_amounts_near_the_maximum_stay_exact(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=10**15, usd="999999.999999999"))
    res = await ledger.reserve(T, "root", tokens=10**15 - 1, nanos=999_999_999_999_998)
    await ledger.commit(T, res.id, used=Amount(tokens=10**15 - 1, nanos=999_999_999_999_997))
    tree = await ledger.snapshot(T)
    assert tree.root.available_nanos == 2
    assert tree.root.available_tokens == 1


async def test_batched_concurrent_reservations_respect_the_limit(ledger: Ledger) -> None:
    await opened(ledger, tokens=1000, usd="1")

    async def one() -> bool:
        try:
            await ledger.reserve(T, "root", tokens=30, nanos=0)
        except BudgetExceeded:
            return False
        return True

    results = await asyncio.gather(*(one() for _ in range(100)))
    assert sum(results) == 33
    assert (await ledger.snapshot(T)).root.reserved_tokens == 990


async def test_non_batching_ledger_behaves_the_same(redis_url: str) -> None:
    led = Ledger(redis_client(redis_url), batch=False)
    try:
        await led.open_task(T, Budget(tokens=10))
        res = await led.reserve(T, "root", tokens=10, nanos=0)
        with pytest.raises(BudgetExceeded):
            await led.reserve(T, "root", tokens=1, nanos=0)
        await led.commit(T, res.id, used=Amount(tokens=3))
        assert (await led.snapshot(T)).root.available_tokens == 7
        # close_task's closes go in one call, deepest first, batching or not.
        await led.open_account(T, "root/a", Budget(tokens=5))
        await led.open_account(T, "root/a/x", Budget(tokens=2))
        await led.open_account(T, "root/a/x/y", Budget(tokens=1))
        closed = await led.close_task(T)
        assert (closed.spent_tokens, closed.returned_tokens) == (3, 7)
        assert all(a.closed for a in (await led.snapshot(T)).walk())
    finally:
        await led.aclose()
